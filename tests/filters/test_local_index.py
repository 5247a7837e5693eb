"""LocalPrefixIndex: prefix matching per endpoint, TTL, size bound, forgetting; and what the
kvcache filter teaches it from the gateway's own traffic (filters.cache_learning)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from filters.base import ResponseHead, Services
from filters.keys import CACHE_HINTS
from filters.kvcache import KVCacheFilter
from filters.local_index import LocalIndexConfig, LocalPrefixIndex, prompt_chunk_keys
from filters.registry import build_filters, plan_filters
from gateway.config import ClusterConfig, EndpointConfig, FilterSpec
from gateway.endpoints import ClusterRegistry, build_cluster
from kvkernel.decode import ConfigError, decode_dataclass
from kvproto.chunks import chunk_keys
from tests.filters.kvcache_rig import PROMPT, DroppingQueue, _endpoint, complete, ctx_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tokens(n: int, seed: int = 0) -> list[int]:
    return [(seed * 7919 + i) % 50000 for i in range(n)]


SHARED = tokens(768)  # three full chunks


def test_keys_are_lmcache_chunk_keys() -> None:
    assert prompt_chunk_keys(SHARED + [1, 2, 3]) == chunk_keys(SHARED)
    assert len(prompt_chunk_keys(SHARED)) == 3


@pytest.mark.parametrize("learned,query,expected", [
    # endpoint learned 3 chunks; query shares them and goes on
    ({"a": SHARED}, SHARED + tokens(300, 1), {"a": 768}),
    # query shares only the first two chunks
    ({"a": SHARED}, SHARED[:512] + tokens(256, 2), {"a": 512}),
    # two endpoints, different depths
    ({"a": SHARED[:256], "b": SHARED}, SHARED, {"a": 256, "b": 768}),
    # different first chunk: nothing
    ({"a": SHARED}, tokens(768, 3), {}),
    # shorter than a chunk: nothing
    ({"a": SHARED}, SHARED[:200], {}),
])
def test_match(learned: dict[str, list[int]], query: list[int], expected: dict[str, int]) -> None:
    index = LocalPrefixIndex(100, 60.0)
    for ep, toks in learned.items():
        index.learn(ep, prompt_chunk_keys(toks))
    assert index.match(prompt_chunk_keys(query)) == expected


def test_match_restricted_to_given_endpoints() -> None:
    index = LocalPrefixIndex(100, 60.0)
    index.learn("a", prompt_chunk_keys(SHARED))
    index.learn("other-cluster", prompt_chunk_keys(SHARED))
    assert index.match(prompt_chunk_keys(SHARED), ["a", "b"]) == {"a": 768}


def test_entries_expire_after_ttl_and_relearning_refreshes() -> None:
    clock = Clock()
    index = LocalPrefixIndex(100, 10.0, clock=clock)
    keys = prompt_chunk_keys(SHARED)
    index.learn("a", keys)
    clock.now += 9
    index.learn("b", keys[:1])
    assert index.match(keys) == {"a": 768, "b": 256}
    clock.now += 2  # a expired, b still fresh
    assert index.match(keys) == {"b": 256}
    assert index.purge_expired() == 2  # chunks 2 and 3 had only `a`
    assert len(index) == 1


def test_size_bound_drops_least_recently_touched() -> None:
    index = LocalPrefixIndex(4, 60.0)
    first = prompt_chunk_keys(SHARED)            # 3 keys
    second = prompt_chunk_keys(tokens(512, 9))   # 2 more: one of `first` must go
    index.learn("a", first)
    index.learn("b", second)
    assert len(index) == 4
    # the oldest key (first chunk of `first`) went, so `first` no longer matches at all
    assert index.match(first) == {}
    assert index.match(second) == {"b": 512}


def test_forget_endpoint_keys() -> None:
    index = LocalPrefixIndex(100, 60.0)
    keys = prompt_chunk_keys(SHARED)
    index.learn("a", keys)
    index.learn("b", keys)
    assert index.forget("a", keys[1:]) == 2
    assert index.match(keys) == {"a": 256, "b": 768}
    assert index.forget("b") == 3
    assert index.match(keys) == {"a": 256}


@pytest.mark.parametrize("raw,error", [
    ({"max_chunks": 0}, "local_index.max_chunks: must be >= 1, got 0"),
    ({"ttl": "0s"}, "local_index.ttl: must be > 0"),
    ({"size": 3}, "local_index.size: unknown key"),
])
def test_config_errors_name_the_field(raw: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        decode_dataclass(LocalIndexConfig, raw, "local_index")
    assert error in str(info.value)


# ---- learned by the kvcache filter from the gateway's own traffic ----


async def test_failed_request_keeps_the_shared_prefix_its_endpoint_already_held(make_rig: Any) -> None:
    rig = await make_rig({})
    await complete(rig.filter, "a", PROMPT[:600])  # a holds the two-chunk shared prefix
    await complete(rig.filter, "a", PROMPT, status=429)  # backpressure: no first byte
    failed = ctx_for()  # accepted (2xx head), then broke before the first byte
    await rig.filter.on_request(failed)
    failed.endpoint = "a"
    await rig.filter.on_response(failed, ResponseHead(200, {}))
    failed.status = 200
    await rig.filter.on_complete(failed)
    ctx = ctx_for()
    await rig.filter.on_request(ctx)
    assert (ctx[CACHE_HINTS].tier, ctx[CACHE_HINTS].matched_tokens) == ("local-index", {"a": 512})


async def test_an_ejected_endpoint_comes_back_without_its_stale_prefixes(make_rig: Any) -> None:
    rig = await make_rig({})
    await complete(rig.filter, "a")
    await complete(rig.filter, "b", PROMPT[:600])
    a = _endpoint(rig, "a")
    a.set_healthy(False)  # crashed: its KV cache is gone
    ctx = ctx_for()
    await rig.filter.on_request(ctx)
    assert (ctx[CACHE_HINTS].preferred_endpoint, ctx[CACHE_HINTS].matched_tokens) == ("b", {"b": 512})
    a.set_healthy(True)  # restarted, empty
    ctx = ctx_for()
    await rig.filter.on_request(ctx)
    assert ctx[CACHE_HINTS].matched_tokens == {"b": 512}


async def test_same_endpoint_id_in_two_clusters_does_not_share_local_index_entries() -> None:
    """Endpoint ids are unique per cluster only (both clusters may call theirs gpu-0)."""
    clusters = ClusterRegistry([
        build_cluster(ClusterConfig("chat", [EndpointConfig("gpu-0", "http://127.0.0.1:8101"),
                                             EndpointConfig("gpu-1", "http://127.0.0.1:8102")])),
        build_cluster(ClusterConfig("batch", [EndpointConfig("gpu-0", "http://127.0.0.3:8101")]))])
    async with httpx.AsyncClient() as http:
        services = Services(clusters=clusters, background=DroppingQueue(0), http=http, metrics=None)
        (kv,) = build_filters(plan_filters([FilterSpec("kvcache", config={})]), services)
        assert isinstance(kv, KVCacheFilter)
        await kv.start()
        served = ctx_for(PROMPT, cluster="batch")
        await kv.on_request(served)
        served.endpoint, served.status, served.ttfb_ms = "gpu-0", 200, 1.0
        await kv.on_complete(served)
        ctx = ctx_for(PROMPT, cluster="chat")
        await kv.on_request(ctx)
        assert (ctx[CACHE_HINTS].tier, ctx[CACHE_HINTS].matched_tokens) == ("none", {})
        again = ctx_for(PROMPT, cluster="batch")
        await kv.on_request(again)
        assert again[CACHE_HINTS].matched_tokens == {"gpu-0": 1024}
        await kv.close()
