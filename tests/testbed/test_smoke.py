"""The compose smoke stack, run from docker-compose.yml's own commands as local processes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    hits = [r for r in generations if r["tier"] == "lmcache"]
    assert hits and all(r["endpoint"] == r["preferred_endpoint"] and r["cached_tokens"] > 0 for r in hits)
