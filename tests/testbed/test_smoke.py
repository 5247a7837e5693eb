"""The compose smoke stack, run from docker-compose.yml's own commands as local processes;
and the demo (`kvgate demo`), which runs the stack and stops what it started."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.procs import kvgate_cmd
from testbed.smoke import Check, run_checks
from testbed.stack import COMPOSE_FILE, LocalStack, Rewriter, load_compose


def test_compose_file_describes_the_stack() -> None:
    services = load_compose(COMPOSE_FILE)
    assert set(services) == {"lmcache", "mlx-a", "mlx-b", "sim-1", "sim-2", "gateway"}
    assert services["gateway"].depends_on == ["lmcache", "mlx-a", "mlx-b", "sim-1", "sim-2"]
    assert all(s.ready_url for s in services.values())
    for backend in ("mlx-a", "mlx-b", "sim-1", "sim-2"):
        assert f"--id {backend} " in " ".join(services[backend].command), "ids match LMCache instance ids"


def test_rewriter_maps_hosts_ports_and_paths_but_not_ids() -> None:
    rewrite = Rewriter(["lmcache", "mlx-a"], {9000: 41000, 9001: 41001, 8101: 42000}, {"/models": "/tmp/w/models"})
    cmd = ("kvgate mlx-serve --model /models/mlx-a/tiny --id mlx-a --host 0.0.0.0 --port 8101 "
           "--lmcache-controller lmcache --lmcache-worker-ip $$(hostname -i) --lmcache-ports '{\"pull\":9001}'")
    assert rewrite(cmd) == (
        "kvgate mlx-serve --model /tmp/w/models/mlx-a/tiny --id mlx-a --host 127.0.0.1 --port 42000 "
        "--lmcache-controller 127.0.0.1 --lmcache-worker-ip 127.0.0.1 --lmcache-ports '{\"pull\":41001}'")
    assert rewrite('url: "http://mlx-a:8101", port: 19000, v: 8101.5') == \
        'url: "http://127.0.0.1:42000", port: 19000, v: 8101.5'


@pytest.fixture(scope="module")
def checks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Check]]:
    workdir = tmp_path_factory.mktemp("smoke")
    with LocalStack(workdir) as stack:
        stack.start()
        results = asyncio.run(run_checks(stack))
        for check in results:
            print(check)
        yield {c.name.split(" ")[0] + ("-" + c.name.split(" ")[1] if c.name.startswith("backend") else ""): c
               for c in results}
        for name, proc in stack.procs.items():
            if name not in ("sim-1", "lmcache"):
                assert proc.alive(), f"{name} died during the smoke run:\n{proc.log_tail()}"


def _assert(check: Check) -> None:
    assert check.ok, f"{check.name}: {check.detail}"


def test_every_request_answered(checks: dict[str, Check]) -> None:
    _assert(checks["every"])


def test_repeated_long_prefix_lands_on_the_backend_holding_it(checks: dict[str, Check]) -> None:
    _assert(checks["repeated"])


def test_killed_backend_is_failed_over(checks: dict[str, Check]) -> None:
    _assert(checks["backend-killed"])


def test_requests_succeed_with_the_controller_killed(checks: dict[str, Check]) -> None:
    _assert(checks["controller"])


def test_gateway_wrote_one_access_log_line_per_request(
    checks: dict[str, Check], tmp_path_factory: pytest.TempPathFactory
) -> None:
    logs = list(Path(tmp_path_factory.getbasetemp()).glob("smoke*/logs/access.jsonl"))
    assert logs, "the gateway's access log (relative to its working dir) exists"
    lines = logs[0].read_text().splitlines()
    assert len(lines) >= 12 + 3 + 20 + 6


def test_demo_runs_the_stack_and_summarises_routing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from testbed.demo import main as demo_main

    assert demo_main(["--keep", str(tmp_path), "--users", "3"]) == 0
    out = capsys.readouterr().out
    assert "preferred endpoint honoured" in out and "prefill skipped" in out
    records = [json.loads(line) for line in (tmp_path / "logs" / "access.jsonl").read_text().splitlines()]
    generations = [r for r in records if r["path"].endswith("completions")]
    assert len(generations) == 9 and all(r["status"] == 200 for r in generations)
    hits = [r for r in generations if r["decision"] == "cache_hit"]
    assert hits and all(r["endpoint"] == r["preferred_endpoint"] for r in hits)
    # A hit predicted from a prefix still prefilling elsewhere in an MLX daemon's batch can
    # find nothing cached yet (the daemon does not share an in-flight prefill): most hit.
    assert sum(r["cached_tokens"] > 0 for r in hits) * 2 >= len(hits)


# ---- the demo's shutdown ----


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _poll(predicate: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            return value
        time.sleep(0.05)
    return value


def test_sigterm_to_kvgate_demo_stops_the_servers_it_started(tmp_path: Path) -> None:
    """SIGTERM used to kill the demo at once, leaving its servers (own sessions) running."""
    demo = subprocess.Popen(kvgate_cmd("demo", "--keep", str(tmp_path), "--users", "1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: set[int] = set()
    try:
        children = _poll(lambda: _children(demo.pid), timeout=60)
        assert children, "the demo started no server"
        demo.send_signal(signal.SIGTERM)
        demo.wait(30)
        left = _poll(lambda: not any(_alive(p) for p in children), timeout=20)
        assert left, f"servers left running after the demo exited: {sorted(p for p in children if _alive(p))}"
    finally:
        demo.kill()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
