"""Cache-aware routing end to end, all real processes on 127.0.0.1.

`kvgate mock-lmcache` + two `kvgate sim-vllm` backends that report their chunks
to it + `kvgate serve` (prompt, tokenizer, kvcache, access-log; lb_policy
cache_aware). Observed through responses (`usage.prompt_tokens_details.cached_tokens`,
`x-kvgate-endpoint`), the access log, the gateway's /metrics and /kvgate/status,
the sims' /sim/state and the mock's fault admin API.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testbed.mock_lmcache.harness import ControllerProcess, start_mock_controller, wait_for_layout
from testbed.procs import HOST, ManagedProcess, free_ports, start_kvgate
from testbed.sim_vllm.harness import start_sims
from tests.conftest import wait_until

pytestmark = pytest.mark.slow

LOOKUP_BUDGET_MS = 50.0
SLACK_MS = 150.0  # scheduling noise on a shared 2-core box; the budget itself is 50 ms


@dataclass
class Stack:
    controller: ControllerProcess
    sims: dict[str, int]  # id -> port
    gateway_port: int
    access_log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.gateway_port}"

    def sim_url(self, sim_id: str) -> str:
        return f"http://{HOST}:{self.sims[sim_id]}"


def gateway_config(sims: dict[str, int], port: int, controller: str, access_log: Path) -> str:
    endpoints = "\n".join(f'      - {{id: {sid}, url: "http://{HOST}:{p}"}}' for sid, p in sims.items())
    first = next(iter(sims.values()))
    return f"""
server: {{host: {HOST}, port: {port}, debug_headers: true}}
clusters:
  - name: llm
    lb_policy: cache_aware
    cache_aware: {{max_waiting: 1}}
    health_check: {{path: /health, interval: 200ms, timeout: 1s}}
    metrics_interval: 100ms
    endpoints:
{endpoints}
routes:
  - {{match: {{prefix: /v1/}}, cluster: llm}}
filters:
  - type: prompt
  - type: tokenizer
    config: {{backend: remote, endpoint: "http://{HOST}:{first}", timeout: 1s}}
  - type: kvcache
    config:
      lmcache_endpoint: "{controller}"
      lookup_timeout: 50ms
      circuit_breaker: {{failure_threshold: 3, recovery_timeout: 1s, half_open_max_calls: 1}}
      cache_strategy: {{enable_pinning: true, hot_window: 1m, hot_threshold: 3, interval: 0s}}
  - type: access-log
    config: {{path: "{access_log}"}}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("routing")
    controller = start_mock_controller(work, admin=True)
    procs: list[ManagedProcess] = []
    try:
        sims = start_sims(2, controller, work, "--max-num-seqs", "2", "--decode-rate", "200")
        procs += [p for _, p in sims.values()]
        (port,) = free_ports(1)
        access_log = work / "access.jsonl"
        config = work / "gateway.yaml"
        config.write_text(gateway_config({s: p for s, (p, _) in sims.items()}, port, controller.url, access_log))
        gateway = start_kvgate("gateway", ["serve", "-c", str(config)], work)
        procs.append(gateway)
        gateway.wait_http(f"http://{HOST}:{port}/readyz")
        yield Stack(controller, {s: p for s, (p, _) in sims.items()}, port, access_log)
    finally:
        for proc in reversed(procs):
            proc.stop()
        controller.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(f" w{rng.randrange(10**6)}" for _ in range(n))


def prefix(seed: int) -> str:
    return f"System {seed}:" + words(1200, seed)


async def complete(stack: Stack, http: httpx.AsyncClient, text: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """One completion through the gateway: (endpoint, usage, access-log record)."""
    rid = uuid.uuid4().hex
    resp = await http.post(stack.url + "/v1/completions", headers={"x-request-id": rid},
                           json={"model": "sim-vllm", "prompt": text, "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    return resp.headers["x-kvgate-endpoint"], resp.json()["usage"], await log_record(stack, rid)


async def log_record(stack: Stack, rid: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        text = stack.access_log.read_text() if stack.access_log.exists() else ""
        found[:] = [r for r in map(json.loads, text.splitlines()) if r["request_id"] == rid]
        return bool(found)

    await wait_until(seen, message=f"access-log line of {rid}")
    return found[0]


async def tokens_of(stack: Stack, http: httpx.AsyncClient, text: str) -> list[int]:
    resp = await http.post(stack.sim_url(next(iter(stack.sims))) + "/tokenize", json={"prompt": text})
    return list(resp.json()["tokens"])


async def wait_held(stack: Stack, http: httpx.AsyncClient, text: str, holder: str) -> None:
    ids = await tokens_of(stack, http, text)
    async with httpx.AsyncClient(base_url=stack.controller.url) as ctl:
        await wait_for_layout(ctl, ids, lambda layout: layout.get(holder, [None, 0])[1] >= 1024)


async def metric(gateway_url: str, http: httpx.AsyncClient, name: str, **labels: str) -> float:
    text = (await http.get(gateway_url + "/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def test_shared_prefix_follows_its_holder_and_hits_its_cache(stack: Stack, http: httpx.AsyncClient) -> None:
    shared = prefix(1)
    holder, usage, first = await complete(stack, http, shared + " Question zero?")
    assert first["decision"] == "no_hint_least_load" and usage["prompt_tokens_details"]["cached_tokens"] == 0
    await wait_held(stack, http, shared, holder)
    for i in range(3):
        endpoint, usage, record = await complete(stack, http, shared + words(20, 100 + i))
        assert endpoint == holder
        # The in-process block index answers first (at 16-token precision); the controller
        # was still asked (no event feed here) and agreed.
        assert (record["tier"], record["decision"]) == ("prefix-index", "cache_hit")
        assert record["routing_reason"] == "prefix_index+lmcache"
        assert record["predicted_cached_tokens"] >= 1024
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 1024  # the backend confirms the hit
        assert record["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
        assert record["lookup_ms"] is not None


async def test_hot_prefix_is_pinned_on_its_holder(stack: Stack, http: httpx.AsyncClient) -> None:
    shared = prefix(2)
    holder, _, _ = await complete(stack, http, shared + " Q?")
    await wait_held(stack, http, shared, holder)
    state = (await http.get(stack.sim_url(holder) + "/sim/state")).json()
    pinned_before = state["cache"]["pinned_blocks"]
    for i in range(3):  # hot_threshold: 3
        assert (await complete(stack, http, shared + words(10, 200 + i)))[0] == holder

    async def pinned() -> bool:
        state = (await http.get(stack.sim_url(holder) + "/sim/state")).json()
        return bool(state["cache"]["pinned_blocks"] >= pinned_before + 1024 // 16)

    await wait_until(pinned, message="the hot prefix pinned on its holder")
    assert await metric(stack.url, http, "kvgate_cache_actions_total", kind="pin", outcome="ok") >= 1


async def test_saturated_holder_gets_no_new_work(stack: Stack, http: httpx.AsyncClient) -> None:
    shared = prefix(3)
    holder, _, _ = await complete(stack, http, shared + " Q?")
    await wait_held(stack, http, shared, holder)

    async def hog(i: int) -> None:  # long streamed generations straight at the holder
        body = {"model": "sim-vllm", "prompt": words(50, 300 + i), "max_tokens": 2000, "stream": True}
        async with http.stream("POST", stack.sim_url(holder) + "/v1/completions", json=body) as resp:
            async for _ in resp.aiter_bytes():
                pass

    hogs = [asyncio.create_task(hog(i)) for i in range(5)]  # max-num-seqs 2: three wait

    async def saturated() -> bool:
        status = (await http.get(stack.url + "/kvgate/status")).json()
        ep = next(e for e in status["endpoints"] if e["id"] == holder)
        return bool((ep["num_requests_waiting"] or 0) > 1)

    try:
        await wait_until(saturated, message="holder saturated (scraped waiting > max_waiting)")
        endpoint, _, record = await complete(stack, http, shared + " Another question?")
        assert endpoint != holder
        assert record["decision"] == "cache_hit_overridden_by_load" and record["saturated"] == [holder]
        assert record["matched_tokens"][holder] >= 1024
    finally:
        for task in hogs:
            task.cancel()
        await asyncio.gather(*hogs, return_exceptions=True)

    async def drained() -> bool:
        return not await saturated()

    await wait_until(drained, message="holder drained")


async def test_slow_controller_costs_at_most_the_lookup_budget(stack: Stack, http: httpx.AsyncClient) -> None:
    shared = prefix(1)
    await complete(stack, http, shared + " Warm?")  # the gateway's local index learns the holder
    await http.post(stack.controller.admin_url + "/admin/faults", json={"latency_ms": 500})
    try:
        for i in range(2):  # below the breaker's failure threshold
            _, _, record = await complete(stack, http, shared + words(10, 400 + i))
            assert record["routing_reason"] == "prefix_index+lmcache_timeout"
            assert record["tier"] == "prefix-index"  # the gateway's own knowledge still answers
            assert LOOKUP_BUDGET_MS * 0.9 <= record["lookup_ms"] <= LOOKUP_BUDGET_MS + SLACK_MS
    finally:
        await http.delete(stack.controller.admin_url + "/admin/faults")
    _, _, record = await complete(stack, http, shared + " back to normal")
    assert record["routing_reason"] == "prefix_index+lmcache"


async def test_controller_down_breaker_opens_then_recovers(stack: Stack, http: httpx.AsyncClient) -> None:
    shared = prefix(1)
    holder, _, _ = await complete(stack, http, shared + " Where is it?")
    await http.post(stack.controller.admin_url + "/admin/faults", json={"down": True})
    try:
        records = [(await complete(stack, http, shared + words(10, 500 + i))) for i in range(6)]
        for endpoint, _, record in records:
            assert endpoint == holder  # the local index still knows the holder
            assert record["tier"] == "prefix-index"
            assert record["lookup_ms"] <= LOOKUP_BUDGET_MS + SLACK_MS
        reasons = [r["routing_reason"] for _, _, r in records]
        assert reasons[-1] == "prefix_index+lmcache_breaker_open" and "breaker_open" not in reasons[0]
        assert records[-1][2]["lookup_ms"] < 10  # an open breaker costs ~nothing
        assert await metric(stack.url, http, "kvgate_lmcache_breaker_state", calls="lookup") == 2
    finally:
        await http.post(stack.controller.admin_url + "/admin/faults", json={"down": False})

    async def recovered() -> bool:
        _, _, record = await complete(stack, http, shared + " recovered?")
        return bool(record["routing_reason"] == "prefix_index+lmcache")

    await wait_until(recovered, timeout=15, interval=0.2, message="breaker closed again")
    assert await metric(stack.url, http, "kvgate_lmcache_breaker_state", calls="lookup") == 0
