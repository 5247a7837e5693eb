"""Background eviction end to end: memory pressure on a backend evicts its cold prefixes.

`kvgate mock-lmcache` + one small `kvgate sim-vllm` (200 KV blocks) + `kvgate serve`
with `cache_strategy.enable_eviction`. A prefix served through the gateway turns
cold; long generations sent straight to the backend push its scraped KV usage over
`memory_threshold`; the next completions through the gateway trigger a round
whose evict reaches the controller (the prefix disappears from `/lookup`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from testbed.mock_lmcache.harness import ControllerProcess, start_mock_controller, wait_for_layout
from testbed.procs import HOST, ManagedProcess, free_ports, start_kvgate
from testbed.sim_vllm.harness import start_sims
from tests.conftest import wait_until
from tests.gateway.test_routing_integration import metric, prefix, words

pytestmark = pytest.mark.slow


class Stack:
    def __init__(self, controller: ControllerProcess, sim_port: int, gateway_port: int) -> None:
        self.controller, self.sim_port, self.gateway_port = controller, sim_port, gateway_port
        self.url = f"http://{HOST}:{gateway_port}"
        self.sim_url = f"http://{HOST}:{sim_port}"


def gateway_config(sim_port: int, port: int, controller: str, access_log: Path) -> str:
    return f"""
server: {{host: {HOST}, port: {port}, debug_headers: true}}
clusters:
  - name: llm
    lb_policy: cache_aware
    cache_aware: {{max_kv_usage: 1.0, max_waiting: 100}}
    health_check: {{path: /health, interval: 200ms, timeout: 1s}}
    metrics_interval: 100ms
    endpoints:
      - {{id: sim-0, url: "http://{HOST}:{sim_port}"}}
routes:
  - {{match: {{prefix: /v1/}}, cluster: llm}}
filters:
  - type: prompt
  - type: tokenizer
    config: {{backend: remote, endpoint: "http://{HOST}:{sim_port}", timeout: 1s}}
  - type: kvcache
    config:
      lmcache_endpoint: "{controller}"
      cache_strategy: {{enable_eviction: true, memory_threshold: 0.5, cold_after: 500ms, interval: 0s}}
  - type: access-log
    config: {{path: "{access_log}"}}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("eviction")
    controller = start_mock_controller(work)
    procs: list[ManagedProcess] = []
    try:
        sims = start_sims(1, controller, work, "--capacity-blocks", "200", "--decode-rate", "100")
        (sim_port, sim_proc), = sims.values()
        procs.append(sim_proc)
        (port,) = free_ports(1)
        config = work / "gateway.yaml"
        config.write_text(gateway_config(sim_port, port, controller.url, work / "access.jsonl"))
        gateway = start_kvgate("gateway", ["serve", "-c", str(config)], work)
        procs.append(gateway)
        gateway.wait_http(f"http://{HOST}:{port}/readyz")
        yield Stack(controller, sim_port, port)
    finally:
        for proc in reversed(procs):
            proc.stop()
        controller.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def test_memory_pressure_evicts_cold_prefix(stack: Stack, http: httpx.AsyncClient) -> None:
    cold = prefix(7)[:4000]  # a few chunks
    resp = await http.post(stack.url + "/v1/completions", json={"model": "sim-vllm", "prompt": cold, "max_tokens": 1})
    assert resp.status_code == 200
    ids = (await http.post(stack.sim_url + "/tokenize", json={"prompt": cold})).json()["tokens"]
    async with httpx.AsyncClient(base_url=stack.controller.url) as ctl:
        await wait_for_layout(ctl, ids, lambda layout: layout.get("sim-0", [None, 0])[1] >= 256)

    async def hog(i: int) -> None:  # long generations straight at the backend hold its KV blocks
        body = {"model": "sim-vllm", "prompt": words(600, 700 + i), "max_tokens": 2000, "stream": True}
        async with http.stream("POST", stack.sim_url + "/v1/completions", json=body) as r:
            async for _ in r.aiter_bytes():
                pass

    hogs = [asyncio.create_task(hog(i)) for i in range(3)]
    try:
        async def pressured() -> bool:
            status = (await http.get(stack.url + "/kvgate/status")).json()
            return bool((status["endpoints"][0]["kv_cache_usage"] or 0) > 0.5)

        await wait_until(pressured, message="scraped KV usage above memory_threshold")

        async def evicted() -> bool:  # each completion through the gateway may run a round
            r = await http.post(stack.url + "/v1/completions",
                                json={"model": "sim-vllm", "prompt": "ping", "max_tokens": 1})
            assert r.status_code == 200
            return await metric(stack.url, http, "kvgate_cache_actions_total", kind="evict", outcome="evicted") >= 1

        await wait_until(evicted, interval=0.1, message="evict action executed")
    finally:
        for task in hogs:
            task.cancel()
        await asyncio.gather(*hogs, return_exceptions=True)
    layout = (await http.post(stack.controller.url + "/lookup", json={"tokens": ids})).json()["layout_info"]
    assert "sim-0" not in layout
