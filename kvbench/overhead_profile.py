"""Where the gateway's CPU goes: a py-spy sample of `kvgate serve` under load, by component.

Optional part of `kvgate bench overhead --py-spy`: runs after the measured rounds
(so they are not slowed down), samples the gateway process while one more
non-streaming round runs, and groups the samples by the leaf frame's module.
C code (uvloop, the HTTP parser, socket system calls) has no Python frame of its
own: its time lands on the Python frame that called it, which is why socket
writes show up under aiohttp's `http_writer` and the event loop under `asyncio.runners`.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

COMPONENTS: tuple[tuple[str, str], ...] = (  # (leaf-frame pattern, component), first match wins
    (r"\(aiohttp/http_writer\.py", "socket writes + HTTP serialising (aiohttp)"),
    (r"^(Runner\.run|run|run_forever|run_until_complete) \(asyncio/", "event loop, socket reads, C parsers (uvloop)"),
    (r"\(aiohttp/(client|client_reqrep|client_proto|connector|payload)\.py", "aiohttp client (upstream request)"),
    (r"\(aiohttp/(web_\w+|base_protocol|helpers|http_parser|tracing)\.py", "aiohttp server (request, routing)"),
    (r"\(aiohttp/streams\.py", "aiohttp body streams"),
    (r"\(json/", "JSON (body parse, prompt digest, access-log line)"),
    (r"\(filters/", "filters (prompt, access-log, runner)"),
    (r"\(gateway/", "gateway (handler, proxy, headers)"),
    (r"\(prometheus_client/", "Prometheus metrics"),
    (r"\((asyncio|_weakrefset|contextvars)", "asyncio tasks"),
)


@dataclass(frozen=True, slots=True)
class Breakdown:
    samples: int
    shares: dict[str, float]  # component -> fraction of samples
    cpu_us_per_request: float  # measured while sampling (py-spy slows the process a little)


def find_py_spy() -> str | None:
    """py-spy on PATH or beside this interpreter (a venv's bin), else None."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def component(leaf: str) -> str:
    for pattern, name in COMPONENTS:
        if re.search(pattern, leaf):
            return name
    return "other"


def group(raw_lines: Iterable[str]) -> tuple[int, dict[str, float]]:
    """py-spy `raw` (collapsed) lines -> (samples, component shares, largest first)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw_lines:
        stack, _, n = line.rstrip().rpartition(" ")
        if stack and n.isdigit():
            counts[component(stack.split(";")[-1])] += int(n)
    total = sum(counts.values())
    return total, {name: n / total for name, n in counts.most_common()} if total else {}


class PySpy:
    """`py-spy record` attached to one process; `stop()` returns the raw sample lines."""

    def __init__(self, exe: str, pid: int, out: Path, rate: int = 1000) -> None:
        self.out = out
        self._proc = subprocess.Popen(
            [exe, "record", "-p", str(pid), "-o", str(out), "--format", "raw", "-r", str(rate), "--nonblocking"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self._proc.stdout is not None
        first = self._proc.stdout.readline()  # printed once sampling has started
        if "Sampling" not in first:
            self._proc.kill()
            raise RuntimeError(f"py-spy could not attach to pid {pid}: {first.strip() or 'no output'}")

    def stop(self) -> list[str]:
        self._proc.send_signal(signal.SIGINT)
        self._proc.communicate(timeout=30)
        return self.out.read_text().splitlines() if self.out.exists() else []


def render_breakdown(b: Breakdown, requests: int, concurrency: int) -> str:
    lines = [
        f"#### Where the gateway's CPU goes (py-spy, {b.samples} samples, non-streaming c={concurrency}, "
        f"{requests} requests, {b.cpu_us_per_request:.0f} µs CPU/request while sampled)",
        "",
        "| component | share | ≈ µs/request |",
        "|---|---:|---:|",
        *(f"| {name} | {share:.0%} | {share * b.cpu_us_per_request:.0f} |" for name, share in b.shares.items()),
    ]
    return "\n".join(lines) + "\n"
