"""kvcache filter: tiers, fallbacks, instance mapping, metrics (respx for the controller)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx
import pytest
import respx

from filters.base import ResponseHead
from filters.keys import CACHE_HINTS, CacheHints
from filters.registry import plan_filters
from gateway.config import FilterSpec
from kvkernel.decode import ConfigError
from tests.conftest import wait_until
from tests.filters.kvcache_rig import CTL, PROMPT, _endpoint, complete, ctx_for, layout


async def test_lookup_hit_maps_instances_to_cluster_endpoints(make_rig: Any) -> None:
    rig = await make_rig({"lmcache_endpoint": CTL})
    route = rig.router.post("/lookup").mock(return_value=httpx.Response(200, json={
        "event_id": "e1",
        "layout_info": {"inst-a": ["LocalCPUBackend", 512], "b": {"location": "LocalCPUBackend", "num_tokens": 1024},
                        "z": ["LocalCPUBackend", 1024], "unknown": ["LocalCPUBackend", 2048]}}))
    ctx = ctx_for()
    await rig.filter.on_request(ctx)
    assert route.calls.last.request.content == httpx.Request("POST", CTL, json={"tokens": PROMPT}).content
    hints = ctx[CACHE_HINTS]
    assert (hints.tier, hints.reason, hints.preferred_endpoint) == ("lmcache", "lmcache", "b")
    assert hints.matched_tokens == {"a": 512, "b": 1024}  # z is another cluster's, unknown maps to nothing
    assert hints.lookup_ms is not None and hints.lookup_ms > 0
    assert ctx.log_fields["routing_reason"] == "lmcache"
    await rig.filter.on_complete(ctx)
    assert rig.metric("kvgate_kvcache_decisions_total", {"tier": "lmcache", "reason": "lmcache"}) == 1
    assert rig.metric("kvgate_kvcache_lookup_seconds_count", {"outcome": "hit"}) == 1


async def test_controller_token_counts_are_bounded_by_the_prompt(make_rig: Any) -> None:
    """A controller's numbers are not trusted beyond what the request holds: a huge count
    never becomes a prediction bigger than the prompt; a negative one makes the answer
    malformed (a failed lookup, no hint from it)."""
    rig = await make_rig({"lmcache_endpoint": CTL})
    route = rig.router.post("/lookup").mock(return_value=layout(**{"inst-a": ("LocalCPUBackend", 10**12)}))
    ctx = ctx_for()
    await rig.filter.on_request(ctx)
    assert ctx[CACHE_HINTS].matched_tokens == {"a": len(PROMPT)}
    route.mock(return_value=layout(**{"inst-a": ("LocalCPUBackend", -5)}))
    ctx = ctx_for()
    await rig.filter.on_request(ctx)
    assert "a" not in ctx[CACHE_HINTS].matched_tokens


async def test_identity_mode_ignores_lmcache_instance_id(make_rig: Any) -> None:
    rig = await make_rig({"lmcache_endpoint": CTL, "instance_map": "identity"})
    rig.router.post("/lookup").mock(return_value=layout(a=("LocalCPUBackend", 256), **{"inst-a": ("x", 768)}))
    ctx = ctx_for()
    await rig.filter.on_request(ctx)
    assert ctx[CACHE_HINTS].matched_tokens == {"a": 256}


async def test_miss_falls_back_to_what_the_gateway_learned(make_rig: Any) -> None:
    rig = await make_rig({"lmcache_endpoint": CTL})
    rig.router.post("/lookup").mock(return_value=layout())
    first = ctx_for()
    await rig.filter.on_request(first)
    assert (first[CACHE_HINTS].tier, first[CACHE_HINTS].reason) == ("none", "lmcache_miss")
    await complete(rig.filter, "c")
    await complete(rig.filter, "a", PROMPT[:600], status=500)  # failures teach nothing
    ctx = ctx_for(PROMPT + [1, 2, 3])
    await rig.filter.on_request(ctx)
    assert (ctx[CACHE_HINTS].tier, ctx[CACHE_HINTS].reason) == ("local-index", "lmcache_miss")
    assert ctx[CACHE_HINTS].matched_tokens == {"c": 1024} and ctx[CACHE_HINTS].preferred_endpoint == "c"


async def test_in_flight_prefix_is_known_from_the_response_head(make_rig: Any) -> None:
    rig = await make_rig({})
    first = ctx_for()
    await rig.filter.on_request(first)
    first.endpoint = "b"
    await rig.filter.on_response(first, ResponseHead(200, {}))
    second = ctx_for()  # arrives while the first is still generating
    await rig.filter.on_request(second)
    assert (second[CACHE_HINTS].tier, second[CACHE_HINTS].preferred_endpoint) == ("local-index", "b")
    first.status = 200  # ...but the first never produced a byte (upstream broke)
    await rig.filter.on_complete(first)
    third = ctx_for()
    await rig.filter.on_request(third)
    assert third[CACHE_HINTS].tier == "none"


async def test_controller_errors_degrade_to_local_index(make_rig: Any) -> None:
    rig = await make_rig({"lmcache_endpoint": CTL, "circuit_breaker": {"failure_threshold": 100}})
    route = rig.router.post("/lookup").mock(return_value=httpx.Response(500, json={"detail": "boom"}))
    await complete(rig.filter, "b")
    ctx = ctx_for()
    await rig.filter.on_request(ctx)
    hints = ctx[CACHE_HINTS]
    assert (hints.tier, hints.reason, hints.matched_tokens) == ("local-index", "lmcache_unavailable", {"b": 1024})
    assert route.call_count == 2  # lookup_retry is off by default: one attempt per request
    route.mock(return_value=httpx.Response(200, json={"no": "layout"}))
    ctx = ctx_for()
    await rig.filter.on_request(ctx)
    assert ctx[CACHE_HINTS].reason == "lmcache_error" and ctx[CACHE_HINTS].tier == "local-index"


async def test_slow_controller_costs_at_most_the_lookup_budget(make_rig: Any) -> None:
    rig = await make_rig({"lmcache_endpoint": CTL, "lookup_timeout": "30ms"})

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return layout(b=("LocalCPUBackend", 1024))

    rig.router.post("/lookup").mock(side_effect=slow)
    ctx = ctx_for()
    await rig.filter.on_request(ctx)
    assert (ctx[CACHE_HINTS].tier, ctx[CACHE_HINTS].reason) == ("none", "lmcache_timeout")
    assert ctx[CACHE_HINTS].lookup_ms is not None and 25 <= ctx[CACHE_HINTS].lookup_ms < 500
    assert rig.metric("kvgate_kvcache_lookup_seconds_count", {"outcome": "timeout"}) == 1


async def test_breaker_opens_then_lookups_cost_nothing_then_recovers(make_rig: Any) -> None:
    rig = await make_rig({"lmcache_endpoint": CTL,
                          "circuit_breaker": {"failure_threshold": 2, "recovery_timeout": "100ms",
                                              "half_open_max_calls": 1}})
    route = rig.router.post("/lookup").mock(side_effect=httpx.ConnectError("refused"))
    for _ in range(2):
        await rig.filter.on_request(ctx_for())
    assert rig.metric("kvgate_lmcache_breaker_state", {"calls": "lookup"}) == 2
    ctx = ctx_for()
    await rig.filter.on_request(ctx)
    assert ctx[CACHE_HINTS].reason == "lmcache_breaker_open" and route.call_count == 2
    route.mock(side_effect=None, return_value=layout(b=("LocalCPUBackend", 512)))
    ctx = ctx_for()

    async def recovered() -> bool:
        ctx[CACHE_HINTS] = CacheHints()
        await rig.filter.on_request(ctx)
        return ctx[CACHE_HINTS].tier == "lmcache"

    await wait_until(recovered, timeout=5, message="breaker recovery")
    assert rig.metric("kvgate_lmcache_breaker_state", {"calls": "lookup"}) == 0


@pytest.mark.parametrize("tokens,cluster", [(None, "llm"), ([], "llm"), (PROMPT, None)])
async def test_no_tokens_no_lookup(make_rig: Any, tokens: list[int] | None, cluster: str | None) -> None:
    rig = await make_rig({"lmcache_endpoint": CTL})
    route = rig.router.post("/lookup").mock(return_value=layout())
    ctx = ctx_for(tokens)
    ctx.cluster = cluster
    await rig.filter.on_request(ctx)
    assert (ctx[CACHE_HINTS].tier, ctx[CACHE_HINTS].reason, route.call_count) == ("none", "no_tokens", 0)


async def test_without_controller_the_local_index_decides(make_rig: Any) -> None:
    rig = await make_rig({"local_index": {"max_chunks": 1000, "ttl": "1m"}})
    ctx = ctx_for()
    await rig.filter.on_request(ctx)
    assert (ctx[CACHE_HINTS].tier, ctx[CACHE_HINTS].reason) == ("none", "no_controller")
    await complete(rig.filter, "a", PROMPT[:700])
    ctx = ctx_for()
    await rig.filter.on_request(ctx)
    hints = ctx[CACHE_HINTS]
    assert (hints.tier, hints.matched_tokens, hints.lookup_ms) == ("local-index", {"a": 512}, None)


async def test_query_instance_mapping_resolves_in_background(make_rig: Any) -> None:
    def routes(router: respx.MockRouter) -> None:
        router.post("/query_instance", name="query").mock(
            return_value=httpx.Response(200, json={"event_id": "q", "res": "vllm-c"}))
        router.post("/lookup").mock(return_value=layout(**{"vllm-c": ("LocalCPUBackend", 768)}))

    rig = await make_rig({"lmcache_endpoint": CTL, "instance_map": "query_instance"}, routes)
    query = rig.router["query"]
    # 127.0.0.1 is shared by a, b and z: only c's host (127.0.0.2) can be asked.
    await wait_until(lambda: query.call_count == 1, message="query_instance")
    assert b'"ip":"127.0.0.2"' in query.calls.last.request.content.replace(b" ", b"")

    async def mapped() -> bool:
        ctx = ctx_for()
        await rig.filter.on_request(ctx)
        return ctx[CACHE_HINTS].matched_tokens == {"c": 768}

    await wait_until(mapped, message="vllm-c mapped to c")
    assert query.call_count == 1  # cached


async def test_hot_prefix_pinned_through_the_controller(make_rig: Any) -> None:
    rig = await make_rig({"lmcache_endpoint": CTL, "cache_strategy": {
        "enable_pinning": True, "hot_threshold": 3, "interval": "0s", "pin_location": "LocalDiskBackend"}})
    rig.router.post("/lookup").mock(return_value=layout(**{"inst-a": ("LocalCPUBackend", 1024)}))
    pin = rig.router.post("/pin").mock(return_value=httpx.Response(200, json={"event_id": "p", "num_tokens": 1024}))
    for i in range(5):
        await complete(rig.filter, "a", PROMPT[:1024] + [i] * 10)
    await wait_until(lambda: rig.metric("kvgate_cache_actions_total", {"kind": "pin", "outcome": "ok"}) == 1,
                     message="pin")
    assert pin.call_count == 1
    body = httpx.Request("POST", CTL, json={"instance_id": "inst-a", "location": "LocalDiskBackend",
                                            "tokens": PROMPT[:1024]}).content
    assert pin.calls.last.request.content == body


@pytest.mark.parametrize("config,error", [
    ({"lookup_timeout": "0ms", "lmcache_endpoint": CTL}, "config.lookup_timeout: must be > 0"),
    ({"lmcache_endpoint": "127.0.0.1:9000"}, "config.lmcache_endpoint: must be an http(s) URL"),
    ({"cache_strategy": {"enable_pinning": True}}, "config.lmcache_endpoint: is required"),
    ({"lmcache_endpoint": CTL, "retry": {"max_attempts": 0}}, "config.retry.max_attempts: must be >= 1, got 0"),
    ({"lmcache_endpoint": CTL, "instance_map": "ip"}, "config.instance_map: must be one of"),
    ({"lmcache_endpoint": CTL, "evict_fallback": "drop"}, "config.evict_fallback: must be one of"),
])
def test_config_errors_name_the_path(config: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        plan_filters([FilterSpec("prompt"), FilterSpec("kvcache", config=config)])
    assert str(info.value).startswith("filters[1](kvcache).") and error in str(info.value)


async def test_rejected_background_actions_do_not_open_the_lookup_breaker(make_rig: Any) -> None:
    from filters.lmcache_client import LMCacheError
    from kvkernel.breaker import CircuitOpenError

    rig = await make_rig({"lmcache_endpoint": CTL, "retry": {"max_attempts": 1},
                          "circuit_breaker": {"failure_threshold": 2, "recovery_timeout": "10s",
                                              "half_open_max_calls": 1}})
    # Real LMCache answers 500 to any compress method but "cachegen".
    compress = rig.router.post("/compress").respond(500, json={"detail": "unsupported method zstd"})
    rig.router.post("/lookup").mock(return_value=layout(b=("LocalCPUBackend", 512)))
    actions = rig.filter.actions_client
    assert actions is not None and actions is not rig.filter.client
    for _ in range(3):
        with pytest.raises((LMCacheError, CircuitOpenError)):
            await actions.compress("inst-a", "zstd", "LocalCPUBackend", PROMPT)
    assert compress.call_count == 2  # the third call met an open breaker
    assert rig.metric("kvgate_lmcache_breaker_state", {"calls": "actions"}) == 2
    assert rig.metric("kvgate_lmcache_breaker_state", {"calls": "lookup"}) == 0
    ctx = ctx_for()
    await rig.filter.on_request(ctx)
    assert ctx[CACHE_HINTS].tier == "lmcache" and ctx[CACHE_HINTS].matched_tokens == {"b": 512}


async def test_hints_never_prefer_an_ejected_endpoint(make_rig: Any) -> None:
    rig = await make_rig({"lmcache_endpoint": CTL})
    rig.router.post("/lookup").mock(return_value=layout(**{"inst-a": ("LocalCPUBackend", 1024),
                                                           "b": ("LocalCPUBackend", 512)}))
    _endpoint(rig, "a").set_healthy(False)
    ctx = ctx_for()
    await rig.filter.on_request(ctx)
    assert ctx[CACHE_HINTS].matched_tokens == {"a": 1024, "b": 512}
    assert ctx[CACHE_HINTS].preferred_endpoint == "b"  # the proxy honours it for non-cache_aware policies


@pytest.mark.parametrize("config,error", [
    ({"lmcache_endpoint": CTL, "instance_map": "query_instance", "instance_map_refresh": "0s"},
     "config.instance_map_refresh: must be > 0"),
    ({"lmcache_endpoint": "http://"}, "config.lmcache_endpoint: must be an http(s) URL with a host"),
    ({"lmcache_endpoint": "http://127.0.0.1:99999"}, "config.lmcache_endpoint: must be an http(s) URL"),
    ({"lmcache_endpoint": CTL, "cache_strategy": {"enable_compression": True, "load_threshold": math.nan}},
     "config.cache_strategy.load_threshold: must be a number > 0, got nan"),
    ({"lmcache_endpoint": CTL, "cache_strategy": {"enable_pinning": True, "pin_location": ""}},
     "config.cache_strategy.pin_location: must not be empty"),
])
def test_kvcache_config_gaps_are_errors_naming_the_path(config: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        plan_filters([FilterSpec("prompt"), FilterSpec("kvcache", config=config)])
    assert str(info.value).startswith("filters[1](kvcache).") and error in str(info.value)


async def test_a_prompt_without_a_full_chunk_costs_no_lookup(make_rig: Any) -> None:
    """Workers report full 256-token chunks only: a shorter prompt can never match, so
    asking the controller only adds up to `lookup_timeout` to the request."""
    rig = await make_rig({"lmcache_endpoint": CTL})
    route = rig.router.post("/lookup").mock(return_value=layout())
    ctx = ctx_for(PROMPT[:255])
    await rig.filter.on_request(ctx)
    assert (ctx[CACHE_HINTS].tier, ctx[CACHE_HINTS].reason, route.call_count) == ("none", "short_prompt", 0)
    await rig.filter.on_request(ctx_for(PROMPT[:256]))
    assert route.call_count == 1


async def test_an_in_flight_longer_prefix_beats_a_shorter_controller_match(make_rig: Any) -> None:
    """A burst of one long prompt: the first request is still prefilling at b (the
    controller has not heard of it), while a holds only the 256-token preamble."""
    rig = await make_rig({"lmcache_endpoint": CTL})
    rig.router.post("/lookup").mock(return_value=layout(**{"inst-a": ("LocalCPUBackend", 256)}))
    first = ctx_for()
    await rig.filter.on_request(first)
    assert (first[CACHE_HINTS].tier, first[CACHE_HINTS].preferred_endpoint) == ("lmcache", "a")
    first.endpoint = "b"
    await rig.filter.on_response(first, ResponseHead(200, {}))
    second = ctx_for()
    await rig.filter.on_request(second)
    assert second[CACHE_HINTS].matched_tokens == {"a": 256, "b": 1024}
    assert (second[CACHE_HINTS].tier, second[CACHE_HINTS].reason, second[CACHE_HINTS].preferred_endpoint) == (
        "local-index", "lmcache_shorter", "b")
