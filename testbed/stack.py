"""Run docker-compose.yml's services: with Docker when an engine answers, else as local processes.

Local mode starts each service's own `command` on 127.0.0.1 with these
rewrites, so the compose file stays the single description of the stack:

- every container port a service lists (`ports` / `expose`) maps to a free local
  port; the number is replaced wherever it appears in commands and config files;
- service hostnames in URLs (`http://lmcache:9000`) and after host flags
  (`--lmcache-controller lmcache`), `0.0.0.0` and `$(hostname -i)` become 127.0.0.1;
- volume targets (`/models`) become directories under the run's work dir;
- a config file a command names (`configs/*.yaml`) is rewritten the same way into the work dir;
- `kvgate` resolves to this interpreter's environment.

Readiness comes from each service's compose `healthcheck`: the URL in its test
is polled (rewritten) until it answers 2xx.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed.procs import HOST, ManagedProcess, free_ports, http_ok

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
HOST_FLAGS = ("--lmcache-controller", "--host", "--worker-ip")
_URL_RE = re.compile(r"https?://[^\s'\"]+")
_CONFIG_RE = re.compile(r"(?<![\w/.])configs/[\w.-]+\.ya?ml")


@dataclass
class Service:
    name: str
    command: list[str]
    ports: list[int]
    depends_on: list[str]
    volumes: dict[str, str]  # volume name or host path -> container path
    ready_url: str | None


def _container_port(spec: Any) -> int:
    text = str(spec.get("target") if isinstance(spec, dict) else spec)
    return int(text.rsplit(":", 1)[-1].split("/")[0])


def _volume(spec: Any) -> tuple[str, str]:
    """(source, container path) of a short-syntax `source:target[:mode]` volume."""
    source, target = str(spec).split(":")[:2]
    return source, target


def _ready_url(service: dict[str, Any]) -> str | None:
    test = (service.get("healthcheck") or {}).get("test")
    found = _URL_RE.search(" ".join(test) if isinstance(test, list) else str(test or ""))
    return found.group(0) if found else None


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Service]:
    """The services of a compose file, in file order."""
    data = yaml.safe_load(path.read_text())
    services: dict[str, Service] = {}
    for name, spec in (data.get("services") or {}).items():
        if spec.get("profiles"):
            continue  # optional services (e.g. the monitoring profile) are not part of the stack
        command = spec.get("command")
        if isinstance(command, str):
            command = shlex.split(command)
        if not command:
            raise ValueError(f"services.{name}.command: local mode needs an explicit command")
        ports = [_container_port(p) for p in [*spec.get("ports", []), *spec.get("expose", [])]]
        depends = spec.get("depends_on") or []
        volumes = dict(_volume(v) for v in spec.get("volumes", []))
        services[name] = Service(name, [str(c) for c in command], sorted(set(ports)),
                                 list(depends), volumes, _ready_url(spec))
    return services


@dataclass
class Rewriter:
    """Container-world text -> local-world text (see the module docstring)."""

    hosts: list[str]
    ports: dict[int, int]
    paths: dict[str, str] = field(default_factory=dict)

    def __call__(self, text: str) -> str:
        text = text.replace("$$(hostname -i)", HOST).replace("$(hostname -i)", HOST).replace("0.0.0.0", HOST)
        for name in self.hosts:
            text = re.sub(rf"(?<=//){re.escape(name)}(?=[:/])", HOST, text)
            flags = "|".join(map(re.escape, HOST_FLAGS))
            text = re.sub(rf"({flags})(\s+|=)['\"]?{re.escape(name)}['\"]?(?![\w-])", rf"\1\g<2>{HOST}", text)
        for old, new in self.ports.items():
            text = re.sub(rf"(?<![\d.]){old}(?!\.?\d)", str(new), text)
        for old_path, new_path in self.paths.items():
            text = re.sub(rf"(?<![\w.]){re.escape(old_path)}(?![\w.-])", new_path, text)
        return text


@dataclass
class _Process(ManagedProcess):
    """A ManagedProcess started in a given working directory."""

    cwd: Path | None = None

    def start(self, env: dict[str, str] | None = None) -> _Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                         start_new_session=True)
        return self


def _waves(services: dict[str, Service]) -> list[list[Service]]:
    """Services grouped so each group's dependencies are in earlier groups."""
    done: set[str] = set()
    waves: list[list[Service]] = []
    while len(done) < len(services):
        wave = [s for s in services.values() if s.name not in done and set(s.depends_on) <= done]
        if not wave:
            raise ValueError(f"dependency cycle among {sorted(set(services) - done)}")
        waves.append(wave)
        done.update(s.name for s in wave)
    return waves


class LocalStack:
    """The compose services as local processes; use as a context manager."""

    def __init__(self, workdir: Path, compose_file: Path = COMPOSE_FILE, ready_timeout: float = 60.0) -> None:
        self.workdir = workdir
        self.services = load_compose(compose_file)
        self.ready_timeout = ready_timeout
        container_ports = sorted({p for s in self.services.values() for p in s.ports})
        self.port_map = dict(zip(container_ports, free_ports(len(container_ports)), strict=True))
        volumes = {target for s in self.services.values() for target in s.volumes.values()}
        paths = {target: str(workdir / "volumes" / target.strip("/").replace("/", "_")) for target in volumes}
        self.rewrite = Rewriter(list(self.services), self.port_map, paths)
        self.procs: dict[str, _Process] = {}

    def url(self, service: str, port: int) -> str:
        """Base URL of a service's container port, as seen from this machine."""
        return f"http://{HOST}:{self.port_map[port]}"

    def local_command(self, service: Service) -> list[str]:
        """The service's command for this machine; config files it names are rewritten copies."""
        return [_CONFIG_RE.sub(self._config_copy, self.rewrite(arg)) for arg in service.command]

    def _config_copy(self, match: re.Match[str]) -> str:
        source = ROOT / match.group(0)
        if not source.is_file():
            return match.group(0)
        target = self.workdir / "configs" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.rewrite(source.read_text()))
        return str(target)

    def start(self, only: Iterable[str] | None = None) -> None:
        """Start services (all, or `only`) wave by wave, waiting for each wave's health checks."""
        wanted = set(only) if only is not None else set(self.services)
        bin_dir = str(Path(sys.executable).parent)
        env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        for path in self.rewrite.paths.values():
            Path(path).mkdir(parents=True, exist_ok=True)
        for wave in _waves(self.services):
            started = []
            for service in wave:
                if service.name not in wanted:
                    continue
                proc = _Process(service.name, self.local_command(service),
                                self.workdir / "logs" / f"{service.name}.log", cwd=self.workdir)
                self.procs[service.name] = proc.start(env)
                started.append(service)
            for service in started:
                if service.ready_url:
                    self.procs[service.name].wait_http(self.rewrite(service.ready_url), self.ready_timeout)

    def kill(self, service: str) -> None:
        self.procs[service].kill()

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop(timeout=5)

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{p.log_tail(15)}" for name, p in self.procs.items())

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While inside, SIGTERM unwinds the stack like Ctrl-C does (as SystemExit), so the
    `with` / `finally` blocks stop the servers this process started: they run in their
    own sessions and would otherwise outlive it. A second SIGTERM during that is
    ignored. The previous handler is restored on the way out (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def docker_available() -> bool:
    """True when a `docker compose` CLI exists and its engine answers."""
    if shutil.which("docker") is None:
        return False
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


class DockerStack:
    """The same stack under `docker compose`; ports are published on 127.0.0.1 as in the compose file."""

    def __init__(self, compose_file: Path = COMPOSE_FILE, project: str = "kvgate-smoke") -> None:
        self.services = load_compose(compose_file)
        self._base = ["docker", "compose", "-f", str(compose_file), "-p", project]

    def url(self, service: str, port: int) -> str:
        return f"http://{HOST}:{port}"

    def start(self, only: Iterable[str] | None = None) -> None:
        subprocess.run([*self._base, "up", "-d", "--build", "--wait", *(only or [])], check=True)

    def kill(self, service: str) -> None:
        subprocess.run([*self._base, "kill", service], check=True)

    def stop(self) -> None:
        subprocess.run([*self._base, "down", "-v", "--timeout", "10"], check=False)

    def logs(self) -> str:
        done = subprocess.run([*self._base, "logs", "--tail", "15"], capture_output=True, text=True, check=False)
        return done.stdout

    def __enter__(self) -> DockerStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate()` until truthy (returned) or raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def ready(url: str) -> bool:
    return http_ok(url)
