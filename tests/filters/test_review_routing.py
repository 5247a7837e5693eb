"""Review of cache-aware routing (issue #5): each test pins a bug found in review."""

from __future__ import annotations

import asyncio
import json
import math
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from filters.base import ResponseHead, Services
from filters.cache_manager import PrefixTracker
from filters.cache_strategy import CacheStrategyConfig, InstanceLoad
from filters.keys import CACHE_HINTS, TOKENS
from filters.keys import PROMPT as PROMPT_KEY
from filters.kvcache import KVCacheFilter
from filters.local_index import prompt_chunk_keys
from filters.prompt import extract_prompt
from filters.registry import build_filters, plan_filters
from filters.tokenization import LocalTokenizer, TokenCache, engine_options, tokenize_body
from filters.tokenizer import TokenizerFilter
from gateway.config import ClusterConfig, EndpointConfig, FilterSpec
from gateway.endpoints import BackendLoad, ClusterRegistry, build_cluster
from kvkernel.context import RequestContext
from kvkernel.decode import ConfigError
from kvtok.chat_tokens import ChatTokenizer, chat_ids, completion_ids
from kvtok.chat_tokens import PromptError as ChatPromptError
from tests.conftest import wait_until
from tests.filters.test_cache_strategy_executor import CFG, Clock, serve
from tests.filters.test_cache_strategy_executor import make as make_manager
from tests.filters.test_kvcache import CTL, PROMPT, _clusters, complete, ctx_for, layout, make_rig

__all__ = ["make_rig"]  # the fixture, re-used


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


class _DroppingQueue:
    """A background queue that is full for the first `full` submits, then runs jobs."""

    def __init__(self, full: int) -> None:
        self.full = full
        self.tasks: list[asyncio.Task[None]] = []

    def submit(self, name: str, job: Callable[[], Awaitable[None]]) -> bool:
        if self.full > 0:
            self.full -= 1
            return False
        self.tasks.append(asyncio.ensure_future(job()))
        return True


async def test_query_instance_dropped_by_a_full_queue_is_asked_again() -> None:
    with respx.mock(base_url=CTL, assert_all_called=False) as router:
        query = router.post("/query_instance").mock(
            return_value=httpx.Response(200, json={"event_id": "q", "res": "vllm-c"}))
        router.post("/lookup").mock(return_value=httpx.Response(
            200, json={"event_id": "e", "layout_info": {"vllm-c": ["LocalCPUBackend", 768]}}))
        async with httpx.AsyncClient() as http:
            services = Services(clusters=_clusters(), background=_DroppingQueue(full=1), http=http, metrics=None)
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


# ---- token ids must equal the engine's (kvtok.chat_tokens is what the daemon prefills) ----

BOS_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model dir whose tokenizer adds a BOS token, like Llama's (the tiny model's does not)."""
    words = ["<s>", "<unk>", "<|", "|>", "user", "assistant", "end", "hello", "world", "the", "answer", "is"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path = tmp_path_factory.mktemp("bos")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": BOS_TEMPLATE, "bos_token": "<s>"}))
    return path


async def _gateway_ids(model_dir: Path, path: str, body: dict[str, Any]) -> list[int] | None:
    async with httpx.AsyncClient() as http:
        flt = TokenizerFilter(TokenizerFilter.Config(backend="local", model_dir=str(model_dir)), "tokenizer",
                              Services(_clusters(), _DroppingQueue(0), http, None))
        return await _run_tokenizer(flt, path, body)


async def _run_tokenizer(flt: TokenizerFilter, path: str, body: dict[str, Any]) -> list[int] | None:
    await flt.start()
    try:
        ctx = RequestContext("r", "POST", path, json=body)
        found = extract_prompt(path, body)
        assert found is not None
        ctx[PROMPT_KEY] = found[0]
        await flt.on_request(ctx)
        return ctx[TOKENS].ids
    finally:
        await flt.close()


CHAT = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "the answer is"}]


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "hello world", "add_special_tokens": False}),
    ("/v1/completions", {"prompt": "hello world"}),
    ("/v1/chat/completions", {"messages": CHAT[:1], "add_special_tokens": True}),
    ("/v1/chat/completions", {"messages": CHAT, "add_generation_prompt": False, "continue_final_message": True}),
    ("/v1/chat/completions", {"messages": CHAT, "add_generation_prompt": False}),
])
async def test_gateway_ids_honour_body_options_like_the_engine(bos_model: Path, path: str,
                                                               body: dict[str, Any]) -> None:
    ct = ChatTokenizer.from_dir(bos_model)
    engine = chat_ids(ct, body) if "messages" in body else completion_ids(ct, body)
    assert await _gateway_ids(bos_model, path, body) == engine


def test_continue_final_message_ends_the_text_at_the_final_content(bos_model: Path) -> None:
    ct = ChatTokenizer.from_dir(bos_model)
    text = ct.render_chat(CHAT, add_generation_prompt=False, continue_final_message=True)
    assert text == "<|user|> hello world <|end|>\n<|assistant|> the answer is"
    with pytest.raises(ChatPromptError, match="both"):
        ct.render_chat(CHAT, add_generation_prompt=True, continue_final_message=True)


def test_remote_tokenize_body_carries_the_engine_options() -> None:
    body = {"messages": CHAT, "add_generation_prompt": False, "continue_final_message": True,
            "add_special_tokens": True}
    found = extract_prompt("/v1/chat/completions", body)
    assert found is not None
    sent = tokenize_body(found[0], engine_options(body, "chat"))
    assert (sent["continue_final_message"], sent["add_special_tokens"]) == (True, True)
    found = extract_prompt("/v1/completions", {"prompt": "hi", "add_special_tokens": False})
    assert found is not None
    assert tokenize_body(found[0], engine_options({"add_special_tokens": False}, "completion"))[
        "add_special_tokens"] is False


# ---- ejected endpoints ----

def _endpoint(rig: Any, endpoint_id: str) -> Any:
    return next(ep for ep in rig.clusters.endpoints("llm") if ep.id == endpoint_id)


async def test_hints_never_prefer_an_ejected_endpoint(make_rig: Any) -> None:
    rig = await make_rig({"lmcache_endpoint": CTL})
    rig.router.post("/lookup").mock(return_value=layout(**{"inst-a": ("LocalCPUBackend", 1024),
                                                           "b": ("LocalCPUBackend", 512)}))
    _endpoint(rig, "a").set_healthy(False)
    ctx = ctx_for()
    await rig.filter.on_request(ctx)
    assert ctx[CACHE_HINTS].matched_tokens == {"a": 1024, "b": 512}
    assert ctx[CACHE_HINTS].preferred_endpoint == "b"  # the proxy honours it for non-cache_aware policies


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


# ---- config validation: every error names its YAML path ----

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


# ---- background cache actions ----

async def test_a_permanently_failing_pin_backs_off_instead_of_running_every_round() -> None:
    clock = Clock()
    manager, control, queue, outcomes = await make_manager(clock)
    control.fail = True
    serve(manager, clock, 3)
    for _ in range(40):  # 40 rounds, one interval apart
        await manager.maybe_run([], 0.0)
        await wait_until(lambda: queue.pending() == 0 and not manager.busy, message="round done")
        clock.now += CFG.interval
    failures = outcomes.count(("pin", "failed"))
    assert 3 <= failures <= 7, outcomes  # rounds 0, 1, 3, 7, 15, 31: not 40
    control.fail = False
    clock.now += 300 * CFG.interval
    serve(manager, clock, 3)  # hot again
    await manager.maybe_run([], 0.0)
    await wait_until(lambda: outcomes[-1] == ("pin", "ok"), message="pin succeeds once the controller is back")
    assert not manager.tracker.backoff
    await queue.close()


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
            queue = _DroppingQueue(0)
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


async def test_big_tool_schemas_are_tokenized_off_the_event_loop(bos_model: Path) -> None:
    """`text_chars` counts message text only; 200 KB of tool schemas must not block the loop."""
    tools = [{"type": "function", "function": {"name": f"tool{i}", "description": "hello world " * 400}}
             for i in range(40)]
    body = {"messages": CHAT[:1], "tools": tools}
    found = extract_prompt("/v1/chat/completions", body)
    assert found is not None and found[0].text_chars < 100
    local = LocalTokenizer.from_dir(bos_model, min_chars_offload=2048)
    try:
        await local.tokenize(found[0])
        assert local.offloaded == 1
    finally:
        await local.close()


def test_hit_tracker_keeps_prompt_tokens_compactly() -> None:
    """10 000 tracked prefixes each pinned a Python list of the request's ids (~36 B a
    token): ~90 MB at the defaults. Kept as 4-byte ids it is about a ninth."""
    tracker = PrefixTracker(CacheStrategyConfig(enable_pinning=True, max_tracked_prefixes=10_000))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for r in range(20):
            tokens = [100_000 + r * 10_000 + t for t in range(4096)]  # ids > 256 are separate int objects
            tracker.record(prompt_chunk_keys(tokens), tokens, "inst-a", float(r))
            del tokens
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(tracker) == 20 * 16
    assert grown < 20 * 4096 * 12, grown  # a list of fresh ints costs ~36 B a token
    assert tracker.prefix_tokens(next(iter(tracker._entries)))[:3] == [100_000, 100_001, 100_002]


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


def test_token_cache_is_bounded_in_bytes_not_only_entries() -> None:
    """10 000 entries of 32k-token prompts would be 1.3 GB at 4 B a token."""
    cache = TokenCache(max_size=10_000, ttl=60.0, max_bytes=1024 * 1024)
    for i in range(40):
        cache.put(("completion", str(i)), list(range(32_768)))  # 128 KiB of ids each
    assert 0 < cache.nbytes <= 1024 * 1024 and len(cache) <= 8
    assert cache.get(("completion", "39")) is not None  # the most recent stays
    cache.put(("completion", "huge"), list(range(300_000)))  # larger than the whole bound: not cached
    assert cache.get(("completion", "huge")) is None and cache.get(("completion", "39")) is not None
    small = TokenCache(max_size=2, ttl=60.0)
    for i in range(5):
        small.put(i, [i])
    assert len(small) == 2 and small.get(4) == [4]


def test_token_cache_max_bytes_is_configurable_and_checked() -> None:
    with pytest.raises(ConfigError, match=r"filters\[1\]\(tokenizer\)\.config\.cache\.max_bytes: must be >= 1"):
        plan_filters([FilterSpec("prompt"), FilterSpec("tokenizer", config={
            "backend": "remote", "endpoint": "http://127.0.0.1:1", "cache": {"max_bytes": 0}})])


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
            services = Services(clusters=clusters, background=_DroppingQueue(0), http=http, metrics=None)
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


async def test_an_evict_that_cleared_the_whole_location_is_not_repeated_for_every_prefix() -> None:
    """Real LMCache has no /evict: the `clear` fallback drops everything the instance
    holds at that location. Twelve cold prefixes must not mean twelve clears."""
    clock = Clock()
    manager, control, queue, outcomes = await make_manager(clock)
    control.evict_outcome = "cleared"
    for i in range(12):
        tokens = [50_000 + i * 1000 + t for t in range(300)]
        manager.record(prompt_chunk_keys(tokens), tokens, "inst-a")
    clock.now += CFG.cold_after + 1
    for _ in range(3):
        await manager.maybe_run([InstanceLoad("inst-a", 0.0, 0.99)], 0.0)
        await wait_until(lambda: queue.pending() == 0 and not manager.busy, message="round done")
        clock.now += CFG.interval
    assert [c[0] for c in control.calls] == ["evict"]
    assert outcomes.count(("evict", "cleared")) == 1 and ("evict", "already_cleared") in outcomes
    await queue.close()


async def test_same_endpoint_id_in_two_clusters_does_not_share_local_index_entries() -> None:
    """Endpoint ids are unique per cluster only (both clusters may call theirs gpu-0)."""
    clusters = ClusterRegistry([
        build_cluster(ClusterConfig("chat", [EndpointConfig("gpu-0", "http://127.0.0.1:8101"),
                                             EndpointConfig("gpu-1", "http://127.0.0.1:8102")])),
        build_cluster(ClusterConfig("batch", [EndpointConfig("gpu-0", "http://127.0.0.3:8101")]))])
    async with httpx.AsyncClient() as http:
        services = Services(clusters=clusters, background=_DroppingQueue(0), http=http, metrics=None)
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
