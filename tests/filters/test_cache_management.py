"""The cache-management part of the kvcache filter: rounds fed by completed requests,
one action per LMCache instance however many clusters reach it, failing actions back off."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import respx

from filters.base import Services
from filters.kvcache import KVCacheFilter
from filters.registry import build_filters, plan_filters
from gateway.config import ClusterConfig, EndpointConfig, FilterSpec
from gateway.endpoints import BackendLoad, ClusterRegistry, build_cluster
from tests.conftest import wait_until
from tests.filters.kvcache_rig import CTL, PROMPT, DroppingQueue, complete, ctx_for, layout


async def test_a_backend_in_two_clusters_gets_each_eviction_once() -> None:
    """The same LMCache instance behind endpoints of two clusters (say, a chat and a
    completions cluster over one vLLM pool) must not get every action twice."""
    clusters = ClusterRegistry([
        build_cluster(ClusterConfig("chat", [EndpointConfig("a", "http://127.0.0.1:8101", lmcache_instance_id="i")])),
        build_cluster(ClusterConfig("completions", [EndpointConfig("a2", "http://127.0.0.1:8101",
                                                                   lmcache_instance_id="i")]))])
    for cluster in ("chat", "completions"):
        for ep in clusters.endpoints(cluster):
            ep.load = BackendLoad(kv_cache_usage=0.99)
    with respx.mock(base_url=CTL, assert_all_called=False) as router:
        router.post("/lookup").mock(return_value=layout())
        evict = router.post("/evict").mock(return_value=httpx.Response(200, json={"event_id": "e", "num_tokens": 1}))
        async with httpx.AsyncClient() as http:
            queue = DroppingQueue(0)
            services = Services(clusters=clusters, background=queue, http=http, metrics=None)
            config = {"lmcache_endpoint": CTL, "cache_strategy": {
                "enable_eviction": True, "cold_after": "0s", "interval": "0s", "memory_threshold": 0.9}}
            (kv,) = build_filters(plan_filters([FilterSpec("kvcache", config=config)]), services)
            assert isinstance(kv, KVCacheFilter)
            await kv.start()
            ctx = ctx_for(PROMPT, cluster="chat")
            await kv.on_request(ctx)
            ctx.endpoint, ctx.status, ctx.ttfb_ms = "a", 200, 1.0
            await kv.on_complete(ctx)
            await asyncio.gather(*queue.tasks)
            assert evict.call_count == 1
            await kv.close()


async def test_failing_pins_back_off_even_with_a_round_per_completion(make_rig: Any) -> None:
    """`interval: 0s` runs a round on every completion: backoff must still hold."""
    rig = await make_rig({"lmcache_endpoint": CTL, "circuit_breaker": {"failure_threshold": 1000},
                          "retry": {"max_attempts": 1},
                          "cache_strategy": {"enable_pinning": True, "hot_threshold": 2, "interval": "0s"}})
    rig.router.post("/lookup").mock(return_value=layout())
    pin = rig.router.post("/pin").mock(return_value=httpx.Response(400, json={"detail": "unknown instance"}))
    for i in range(30):
        await complete(rig.filter, "a", PROMPT[:1024] + [i] * 10)
        await wait_until(lambda: not rig.filter.manager.busy, message="pin round done")
    assert 1 <= pin.call_count <= 2
