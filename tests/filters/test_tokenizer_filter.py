"""The `tokenizer` filter: strict config, sources (request/cache/local/remote), failures never fail a
request; and in a live gateway (real aiohttp servers on 127.0.0.1) with the access log."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import respx
from prometheus_client import CollectorRegistry
from tokenizers import Tokenizer

from filters.base import Action, Services
from filters.keys import PROMPT, TOKENS
from filters.prompt import extract_prompt
from filters.registry import plan_filters
from filters.tokenizer import TokenizerConfig, TokenizerFilter
from gateway.config import FilterSpec
from kvkernel.context import RequestContext
from kvkernel.decode import ConfigError, decode_dataclass
from kvtok.chat_tokens import ChatTokenizer, chat_ids, completion_ids
from mlxd.tiny_model import write_model
from testbed.fake_openai import FakeBackend
from testbed.procs import free_port
from tests.conftest import CHAT, wait_until
from tests.filters.kvcache_rig import DroppingQueue, _clusters
from tests.gateway.harness import gateway_yaml, start_backend, start_gateway

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a KV cache?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


def decode(raw: dict[str, Any]) -> TokenizerConfig:
    return decode_dataclass(TokenizerConfig, raw, "filters[1](tokenizer).config")


def test_config_defaults_and_durations(model_dir: Path) -> None:
    cfg = decode({"backend": "remote", "endpoint": "http://127.0.0.1:8101", "timeout": "150ms",
                  "cache": {"max_size": 10, "ttl": "10m"}, "retry": {"max_attempts": 3},
                  "circuit_breaker": {"failure_threshold": 2, "recovery_timeout": "5s"}})
    assert (cfg.timeout, cfg.cache.max_size, cfg.cache.ttl, cfg.retry.max_attempts) == (0.15, 10, 600.0, 3)
    assert cfg.circuit_breaker.recovery_timeout == 5.0
    assert decode({"backend": "local", "model_dir": str(model_dir)}).model_dir == str(model_dir)


@pytest.mark.parametrize("raw, message", [
    ({}, "config.backend: required key is missing"),
    ({"backend": "gpu"}, "config.backend: must be one of 'local', 'remote'"),
    ({"backend": "local"}, "config.model_dir: required when backend is 'local'"),
    ({"backend": "local", "model_dir": "/nonexistent/model"}, "config.model_dir: no tokenizer.json"),
    ({"backend": "remote"}, "config.endpoint: required when backend is 'remote'"),
    ({"backend": "remote", "endpoint": "127.0.0.1:8101"}, "config.endpoint: required when backend is 'remote'"),
    ({"backend": "remote", "endpoint": "http://x", "timeout": 0}, "config.timeout: must be > 0"),
    ({"backend": "remote", "endpoint": "http://x", "retry": {"max_attempts": 0}},
     "config.retry.max_attempts: must be >= 1, got 0"),
    ({"backend": "remote", "endpoint": "http://x", "cache": {"ttl": "0s"}}, "config.cache.ttl: must be > 0"),
    ({"backend": "remote", "endpoint": "http://x", "cache": {"size": 3}}, "config.cache.size: unknown key"),
    ({"backend": "remote", "endpoint": "http://x", "circuit_breaker": {"failure_threshold": 0}},
     "config.circuit_breaker.failure_threshold: must be >= 1"),
])
def test_config_errors_name_the_yaml_path(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        decode(raw)
    assert str(info.value).startswith("filters[1](tokenizer).")
    assert message in str(info.value)


def test_registered_and_planned(model_dir: Path) -> None:
    plans = plan_filters([FilterSpec(type="tokenizer", config={"backend": "local", "model_dir": str(model_dir)})])
    assert plans[0].cls is TokenizerFilter


def _ctx(path: str, body: dict[str, Any]) -> RequestContext:
    ctx = RequestContext("r1", "POST", path, json=body)
    found = extract_prompt(path, body)
    assert found is not None
    ctx[PROMPT] = found[0]
    return ctx


class _NoClusters:
    def endpoints(self, cluster: str) -> list[Any]:
        return []

    def cluster_names(self) -> list[str]:
        return []


class _NoBackground:
    def submit(self, name: str, job: Any) -> bool:
        return False


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def _started(config: dict[str, Any], http: httpx.AsyncClient,
                   registry: CollectorRegistry | None = None) -> TokenizerFilter:
    flt = TokenizerFilter(decode(config), "tokenizer", Services(_NoClusters(), _NoBackground(), http, registry))
    await flt.start()
    return flt


async def test_local_then_cache_then_request_ids(model_dir: Path, http: httpx.AsyncClient) -> None:
    registry = CollectorRegistry()
    flt = await _started({"backend": "local", "model_dir": str(model_dir)}, http, registry)
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    first = _ctx("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES})
    assert (await flt.on_request(first)).action is Action.CONTINUE
    assert first[TOKENS].source == "local" and first[TOKENS].ids
    assert raw.decode(first[TOKENS].ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    again = _ctx("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES})
    await flt.on_request(again)
    assert again[TOKENS].source == "cache" and again[TOKENS].ids == first[TOKENS].ids
    other_model = _ctx("/v1/chat/completions", {"model": "other", "messages": MESSAGES})
    await flt.on_request(other_model)
    assert other_model[TOKENS].source == "local"
    given = _ctx("/v1/completions", {"model": "tiny", "prompt": [5, 6, 7]})
    await flt.on_request(given)
    assert given[TOKENS].ids == [5, 6, 7] and given[TOKENS].source == "request"
    count = registry.get_sample_value
    assert count("kvgate_tokenizer_results_total", {"filter": "tokenizer", "source": "local"}) == 2
    assert count("kvgate_tokenizer_results_total", {"filter": "tokenizer", "source": "cache"}) == 1
    assert count("kvgate_tokenizer_results_total", {"filter": "tokenizer", "source": "request"}) == 1
    await flt.close()


async def test_no_prompt_leaves_context_alone(model_dir: Path, http: httpx.AsyncClient) -> None:
    flt = await _started({"backend": "local", "model_dir": str(model_dir)}, http)
    ctx = RequestContext("r", "GET", "/v1/models")
    assert (await flt.on_request(ctx)).action is Action.CONTINUE
    assert ctx.get(TOKENS) is None and ctx.get(TOKENS) is None
    await flt.close()


async def test_remote_failures_continue_and_are_counted(http: httpx.AsyncClient) -> None:
    registry = CollectorRegistry()
    config = {"backend": "remote", "endpoint": "http://tok.test:9", "retry": {"max_attempts": 1},
              "circuit_breaker": {"failure_threshold": 2, "recovery_timeout": "1h"}}
    with respx.mock(assert_all_called=False) as router:
        route = router.post("http://tok.test:9/tokenize").mock(side_effect=httpx.ConnectError("refused"))
        flt = await _started(config, http, registry)
        reasons = []
        for _ in range(4):
            ctx = _ctx("/v1/completions", {"model": "m", "prompt": "hello"})
            assert (await flt.on_request(ctx)).action is Action.CONTINUE
            assert ctx.get(TOKENS) is None and ctx.get(TOKENS) is None
            reasons.append(ctx.log_fields["tokenizer_error"])
        assert reasons == ["unavailable", "unavailable", "circuit_open", "circuit_open"]
        assert route.call_count == 2
    sample = registry.get_sample_value
    assert sample("kvgate_tokenizer_failures_total", {"filter": "tokenizer", "reason": "unavailable"}) == 2
    assert sample("kvgate_tokenizer_failures_total", {"filter": "tokenizer", "reason": "circuit_open"}) == 2
    assert sample("kvgate_tokenizer_breaker_state", {"filter": "tokenizer"}) == 2


async def test_remote_success_is_cached(http: httpx.AsyncClient) -> None:
    with respx.mock(assert_all_called=False) as router:
        route = router.post("http://tok.test:9/tokenize").respond(200, json={"count": 2, "tokens": [11, 12]})
        flt = await _started({"backend": "remote", "endpoint": "http://tok.test:9"}, http)
        sources = []
        for _ in range(3):
            ctx = _ctx("/v1/chat/completions", {"model": "m", "messages": MESSAGES})
            await flt.on_request(ctx)
            assert ctx[TOKENS].ids == [11, 12]
            sources.append(ctx[TOKENS].source)
    assert sources == ["remote", "cache", "cache"]
    assert route.call_count == 1


async def test_two_filters_share_one_registry(model_dir: Path, http: httpx.AsyncClient) -> None:
    registry = CollectorRegistry()
    config = decode({"backend": "local", "model_dir": str(model_dir)})
    services = Services(_NoClusters(), _NoBackground(), http, registry)
    a, b = TokenizerFilter(config, "tok-a", services), TokenizerFilter(config, "tok-b", services)
    await a.start()
    await b.start()
    for flt in (a, b):
        await flt.on_request(_ctx("/v1/completions", {"prompt": "x"}))
    assert registry.get_sample_value("kvgate_tokenizer_results_total", {"filter": "tok-b", "source": "local"}) == 1
    await a.close()
    await b.close()


async def _post(url: str, path: str, body: dict[str, Any]) -> int:
    async with aiohttp.ClientSession() as session, session.post(url + path, json=body) as resp:
        await resp.read()
        return resp.status


async def test_in_a_live_gateway_local_ids_reach_the_access_log(tmp_path: Path, model_dir: Path) -> None:
    fake = FakeBackend("a")
    backend = await start_backend(fake)
    log_path = tmp_path / "access.jsonl"
    extra = f'  - type: tokenizer\n    config: {{backend: local, model_dir: "{model_dir}"}}\n'
    gateway = await start_gateway(gateway_yaml({"a": backend.port}, log_path, extra_filters=extra))
    try:
        url = f"http://127.0.0.1:{gateway.port}"
        body = {"model": "tiny", "messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}
        assert await _post(url, "/v1/chat/completions", body) == 200
        assert await _post(url, "/v1/chat/completions", body) == 200
        await wait_until(lambda: log_path.exists() and len(log_path.read_text().splitlines()) == 2)
        lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    finally:
        await gateway.close()
        await backend.close()
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    rendered = ("<|im_start|>system\n# Tools\n" + json.dumps(body["tools"][0]) + "\n<|im_end|>\n"
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is a KV cache?<|im_end|>\n"
                "<|im_start|>assistant\n")
    expected = len(raw.encode(rendered, add_special_tokens=False).ids)
    assert [line["prompt_tokens_local"] for line in lines] == [expected, expected]
    assert all("tokenizer_error" not in line for line in lines)


async def test_in_a_live_gateway_a_dead_tokenizer_never_fails_requests(tmp_path: Path) -> None:
    fake = FakeBackend("a")
    backend = await start_backend(fake)
    log_path = tmp_path / "access.jsonl"
    dead = f"http://127.0.0.1:{free_port()}"
    extra = (f'  - type: tokenizer\n    config: {{backend: remote, endpoint: "{dead}", timeout: 100ms,'
             ' circuit_breaker: {failure_threshold: 2, recovery_timeout: 1h}}\n')
    gateway = await start_gateway(gateway_yaml({"a": backend.port}, log_path, extra_filters=extra))
    try:
        url = f"http://127.0.0.1:{gateway.port}"
        statuses = [await _post(url, "/v1/completions", {"model": "m", "prompt": f"p{i}"}) for i in range(4)]
        await wait_until(lambda: log_path.exists() and len(log_path.read_text().splitlines()) == 4)
        lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    finally:
        await gateway.close()
        await backend.close()
    assert statuses == [200] * 4 and len(fake.requests) == 4
    assert [line["tokenizer_error"] for line in lines] == ["unavailable", "unavailable", "circuit_open", "circuit_open"]
    assert all(line["prompt_tokens_local"] is None for line in lines)


# ---- ids equal the engine's (kvtok.chat_tokens is what the daemon prefills) ----


async def _gateway_ids(model_dir: Path, path: str, body: dict[str, Any]) -> list[int] | None:
    async with httpx.AsyncClient() as http:
        flt = TokenizerFilter(TokenizerFilter.Config(backend="local", model_dir=str(model_dir)), "tokenizer",
                              Services(_clusters(), DroppingQueue(0), http, None))
        return await _run_tokenizer(flt, path, body)


async def _run_tokenizer(flt: TokenizerFilter, path: str, body: dict[str, Any]) -> list[int] | None:
    await flt.start()
    try:
        ctx = RequestContext("r", "POST", path, json=body)
        found = extract_prompt(path, body)
        assert found is not None
        ctx[PROMPT] = found[0]
        await flt.on_request(ctx)
        return ctx[TOKENS].ids
    finally:
        await flt.close()


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


def test_token_cache_max_bytes_is_configurable_and_checked() -> None:
    with pytest.raises(ConfigError, match=r"filters\[1\]\(tokenizer\)\.config\.cache\.max_bytes: must be >= 1"):
        plan_filters([FilterSpec("prompt"), FilterSpec("tokenizer", config={
            "backend": "remote", "endpoint": "http://127.0.0.1:1", "cache": {"max_bytes": 0}})])
