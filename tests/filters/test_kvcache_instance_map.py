"""InstanceMap: explicit / identity / query_instance mapping of LMCache instance ids, alone and
through the kvcache filter."""

from __future__ import annotations

import json

import httpx
import pytest
import respx

from filters.base import Services
from filters.instance_map import RETRY_AFTER, InstanceMap
from filters.keys import CACHE_HINTS
from filters.kvcache import KVCacheFilter
from filters.registry import build_filters, plan_filters
from gateway.config import ClusterConfig, EndpointConfig, FilterSpec
from gateway.endpoints import ClusterRegistry, Endpoint, build_cluster
from tests.conftest import wait_until
from tests.filters.kvcache_rig import CTL, DroppingQueue, _clusters, ctx_for, layout


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def endpoints() -> list[Endpoint]:
    return build_cluster(ClusterConfig("llm", [
        EndpointConfig("a", "http://10.0.0.1:8000", lmcache_instance_id="vllm-a"),
        EndpointConfig("b", "http://10.0.0.2:8000"),
        EndpointConfig("c", "http://10.0.0.3:8000"),
        EndpointConfig("d", "http://10.0.0.3:8001"),
    ])).endpoints


@pytest.mark.parametrize("mode,expected", [
    ("explicit", {"vllm-a": "a", "b": "b", "c": "c", "d": "d"}),
    ("identity", {"a": "a", "b": "b", "c": "c", "d": "d"}),
])
def test_static_modes(mode: str, expected: dict[str, str]) -> None:
    assert InstanceMap(mode).to_endpoints(endpoints()) == expected  # type: ignore[arg-type]


async def test_query_instance_asks_unique_hosts_only_and_caches() -> None:
    asked: list[str] = []

    async def query(ip: str) -> str | None:
        asked.append(ip)
        return {"10.0.0.2": "engine-b"}.get(ip)

    clock = Clock()
    eps = endpoints()
    imap = InstanceMap("query_instance", query=query, all_endpoints=eps, refresh=60.0, clock=clock)
    # a has an explicit id; c and d share a host, so the controller cannot tell them apart
    assert imap.claim_stale(eps) == ["10.0.0.2"]
    assert imap.claim_stale(eps) == []  # pending: not claimed twice
    assert imap.to_endpoints(eps)["b"] == "b"  # unresolved: explicit/identity meanwhile
    assert await imap.resolve("10.0.0.2") == "engine-b"
    assert imap.to_endpoints(eps) == {"vllm-a": "a", "engine-b": "b", "c": "c", "d": "d"}
    clock.now += 59
    assert imap.claim_stale(eps) == []
    clock.now += 1
    assert imap.claim_stale(eps) == ["10.0.0.2"]
    assert asked == ["10.0.0.2"]


async def test_failed_query_keeps_the_old_answer_and_retries_soon() -> None:
    answers: list[str | Exception] = ["engine-b", RuntimeError("controller down")]

    async def query(ip: str) -> str | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    clock = Clock()
    eps = endpoints()
    imap = InstanceMap("query_instance", query=query, all_endpoints=eps, refresh=60.0, clock=clock)
    await imap.resolve("10.0.0.2")
    clock.now += 60
    with pytest.raises(RuntimeError):
        await imap.resolve(imap.claim_stale(eps)[0])
    assert imap.to_endpoints(eps)["engine-b"] == "b"
    assert imap.claim_stale(eps) == []
    clock.now += RETRY_AFTER
    assert imap.claim_stale(eps) == ["10.0.0.2"]


# ---- query_instance through the kvcache filter ----


async def test_query_instance_dropped_by_a_full_queue_is_asked_again() -> None:
    with respx.mock(base_url=CTL, assert_all_called=False) as router:
        query = router.post("/query_instance").mock(
            return_value=httpx.Response(200, json={"event_id": "q", "res": "vllm-c"}))
        router.post("/lookup").mock(return_value=httpx.Response(
            200, json={"event_id": "e", "layout_info": {"vllm-c": ["LocalCPUBackend", 768]}}))
        async with httpx.AsyncClient() as http:
            services = Services(clusters=_clusters(), background=DroppingQueue(full=1), http=http, metrics=None)
            spec = FilterSpec("kvcache", config={"lmcache_endpoint": CTL, "instance_map": "query_instance"})
            (kv,) = build_filters(plan_filters([spec]), services)
            assert isinstance(kv, KVCacheFilter)
            await kv.start()  # its query of 127.0.0.2 is dropped

            async def mapped() -> bool:
                ctx = ctx_for()
                await kv.on_request(ctx)
                return ctx[CACHE_HINTS].matched_tokens == {"c": 768}

            await wait_until(mapped, timeout=3, message="c's host asked again after the drop")
            assert query.call_count == 1
            await kv.close()


async def test_query_instance_asks_by_ip_for_an_endpoint_named_by_hostname() -> None:
    """LMCache knows workers by IP; `http://localhost:8101` must be asked as 127.0.0.1."""
    clusters = ClusterRegistry([build_cluster(ClusterConfig("llm", [
        EndpointConfig("a", "http://localhost:8101"), EndpointConfig("b", "http://127.0.0.2:8102")]))])

    def by_ip(request: httpx.Request) -> httpx.Response:
        ip = json.loads(request.content)["ip"]
        return httpx.Response(200, json={"event_id": "q", "res": {"127.0.0.1": "vllm-a"}.get(ip, "")})

    with respx.mock(base_url=CTL, assert_all_called=False) as router:
        router.post("/query_instance").mock(side_effect=by_ip)
        router.post("/lookup").mock(return_value=layout(**{"vllm-a": ("LocalCPUBackend", 512)}))
        async with httpx.AsyncClient() as http:
            services = Services(clusters=clusters, background=DroppingQueue(0), http=http, metrics=None)
            spec = FilterSpec("kvcache", config={"lmcache_endpoint": CTL, "instance_map": "query_instance"})
            (kv,) = build_filters(plan_filters([spec]), services)
            assert isinstance(kv, KVCacheFilter)
            await kv.start()

            async def mapped() -> bool:
                ctx = ctx_for()
                await kv.on_request(ctx)
                return ctx[CACHE_HINTS].matched_tokens == {"a": 512}

            await wait_until(mapped, timeout=3, message="localhost resolved to 127.0.0.1's instance")
            await kv.close()
