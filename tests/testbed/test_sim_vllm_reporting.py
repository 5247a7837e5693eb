"""sim-vllm as an LMCache worker: its cache appears in the mock controller's /lookup, and the
controller's pin/clear/compress/health reach the simulated cache. Both run as real processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from testbed.procs import ManagedProcess, free_ports, start_kvgate
from testbed.stack import wait_until

LOC = "LocalCPUBackend"


class Stack:
    def __init__(self, controller: str, sim: str) -> None:
        self.controller = controller
        self.sim = sim
        self.http = httpx.Client(timeout=10)

    def complete(self, tokens: list[int]) -> dict[str, Any]:
        resp = self.http.post(
            f"{self.sim}/v1/completions", json={"prompt": tokens, "max_tokens": 1}
        )
        resp.raise_for_status()
        return dict(resp.json())

    def ctl(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = self.http.post(f"{self.controller}{path}", json=body)
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    def layout(self, tokens: list[int]) -> dict[str, Any]:
        return dict(self.ctl("/lookup", {"tokens": tokens})["layout_info"])

    def wait_layout(self, tokens: list[int], expected: dict[str, Any]) -> None:
        wait_until(lambda: self.layout(tokens) == expected, 10, f"lookup == {expected}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("sim-reporting")
    http_port, pull, reply, heartbeat, sim_port = free_ports(5)
    monitor = json.dumps({"pull": pull, "reply": reply, "heartbeat": heartbeat})
    procs: list[ManagedProcess] = []
    try:
        ctl = start_kvgate(
            "mock-lmcache",
            ["mock-lmcache", "--port", str(http_port), "--monitor-ports", monitor],
            logs,
        )
        procs.append(ctl)
        ctl.wait_http(f"http://127.0.0.1:{http_port}/controller/workers")
        sim = start_kvgate(
            "sim-1",
            [
                "sim-vllm",
                "--id",
                "sim-1",
                "--port",
                str(sim_port),
                "--capacity-blocks",
                "64",
                "--prefill-rate",
                "100000",
                "--lmcache-controller",
                "127.0.0.1",
                "--lmcache-ports",
                monitor,
                "--heartbeat-interval",
                "0.5",
            ],
            logs,
        )
        procs.append(sim)
        sim.wait_http(f"http://127.0.0.1:{sim_port}/health")
        stack = Stack(f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{sim_port}")
        try:
            yield stack
        finally:
            stack.http.close()
    finally:
        for proc in reversed(procs):
            proc.stop()


def _prompt(seed: int, n: int = 600) -> list[int]:
    return [seed * 10_000 + i for i in range(n)]


def test_cached_chunks_appear_in_lookup_and_follow_eviction(stack: Stack) -> None:
    stack.ctl("/clear", {"instance_id": "sim-1", "location": LOC})
    a, b = _prompt(1), _prompt(2)
    assert stack.layout(a) == {}
    stack.complete(a)
    stack.wait_layout(a, {"sim-1": [LOC, 512]})
    stack.complete(b)  # 64-block cache: b's 37 blocks push a's tail (and 2nd chunk) out
    stack.wait_layout(b, {"sim-1": [LOC, 512]})
    stack.wait_layout(a, {"sim-1": [LOC, 256]})


def test_pin_compress_clear_and_health_reach_the_simulated_cache(stack: Stack) -> None:
    stack.ctl("/clear", {"instance_id": "sim-1", "location": LOC})
    a = _prompt(3)
    stack.complete(a)
    stack.wait_layout(a, {"sim-1": [LOC, 512]})
    assert (
        stack.ctl("/pin", {"instance_id": "sim-1", "location": LOC, "tokens": a})["num_tokens"]
        == 592
    )
    for seed in (4, 5, 6):  # pressure: the pinned prefix stays
        stack.complete(_prompt(seed))
    assert stack.layout(a) == {"sim-1": [LOC, 512]}
    body = {"instance_id": "sim-1", "location": LOC, "method": "zstd", "tokens": a}
    assert stack.ctl("/compress", body)["num_tokens"] == 592
    state = stack.http.get(f"{stack.sim}/sim/state").json()
    assert state["cache"]["compressed_blocks"] == 37 and state["cache"]["pinned_blocks"] == 37
    assert stack.ctl("/decompress", body)["num_tokens"] == 592
    assert stack.ctl("/health", {"instance_id": "sim-1"})["error_codes"] == {"0": 0}
    assert stack.ctl("/clear", {"instance_id": "sim-1", "location": LOC})["num_tokens"] > 592
    stack.wait_layout(a, {})
    assert stack.http.get(f"{stack.sim}/sim/state").json()["cache"]["blocks"] == 0


def test_a_bad_control_message_is_an_error_and_the_worker_keeps_serving(stack: Stack) -> None:
    resp = stack.http.post(
        f"{stack.controller}/compress",
        json={"instance_id": "sim-1", "location": LOC, "method": "bogus", "tokens": _prompt(7)},
    )
    assert resp.status_code == 500 and "bogus" in resp.json()["detail"]
    assert stack.complete(_prompt(7))["usage"]["prompt_tokens"] == 600
    reporter = stack.http.get(f"{stack.sim}/sim/state").json()["reporter"]
    assert (
        reporter["registered"] == 1 and reporter["admitted"] > 0 and reporter["control_errors"] >= 1
    )


def test_cli_rejects_half_a_controller_config(tmp_path: Path) -> None:
    from testbed.sim_vllm.cli import main

    assert main(["--id", "x", "--port", "1", "--lmcache-controller", "127.0.0.1"]) == 2
    assert (
        main(["--id", "x", "--port", "1", "--lmcache-controller", "h", "--lmcache-ports", "{bad"])
        == 2
    )
