"""Tokenizer backends: local (the seeded tiny model's tokenizer dir) and remote (`/tokenize`, respx)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from tokenizers import Tokenizer

from filters.keys import Prompt
from filters.prompt import extract_prompt
from filters.tokenization import (
    LocalTokenizer,
    RemoteTokenizer,
    TokenCache,
    TokenizeFailed,
    cache_key,
    engine_options,
    tokenize_body,
)
from kvkernel.breaker import BreakerState, CircuitBreaker
from kvkernel.resilience import RetrySettings
from mlxd.tiny_model import write_model
from tests.conftest import CHAT

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "7"}, {"role": "user", "content": "Another?"}]
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
TOK = "http://tok.test:8101"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="module")
def raw(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture
async def local(model_dir: Path) -> AsyncIterator[LocalTokenizer]:
    tok = LocalTokenizer.from_dir(model_dir, min_chars_offload=1000)
    yield tok
    await tok.close()


def chat(messages: list[dict[str, Any]] = MESSAGES, **kw: Any) -> Prompt:
    chars = sum(len(m.get("content") or "") for m in messages)
    return Prompt("chat", kw.pop("model", "tiny"), "d", messages=messages, text_chars=chars, **kw)


def completion(text: str | list[int], model: str | None = "tiny") -> Prompt:
    return Prompt("completion", model, "d", prompts=[text], text_chars=len(text) if isinstance(text, str) else 0)


async def test_local_completion_matches_tokenizer_json(local: LocalTokenizer, raw: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    ids = await local.tokenize(completion(text))
    assert ids == raw.encode(text, add_special_tokens=True).ids
    assert raw.decode(ids) == text


async def test_local_chat_applies_the_template_to_all_messages(local: LocalTokenizer, raw: Tokenizer) -> None:
    ids = await local.tokenize(chat())
    expected = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nName a prime.<|im_end|>\n"
                "<|im_start|>assistant\n7<|im_end|>\n<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\n")
    assert ids == raw.encode(expected, add_special_tokens=False).ids
    assert ids.count(raw.token_to_id("<|im_start|>")) == 5


async def test_local_chat_without_generation_prompt(local: LocalTokenizer, raw: Tokenizer) -> None:
    with_gen = await local.tokenize(chat())
    without = await local.tokenize(chat(add_generation_prompt=False))
    assert with_gen[: len(without)] == without
    assert raw.decode(with_gen[len(without):], skip_special_tokens=False) == "<|im_start|>assistant\n"


async def test_local_chat_renders_tools(local: LocalTokenizer, raw: Tokenizer) -> None:
    plain = await local.tokenize(chat())
    with_tools = await local.tokenize(chat(tools=TOOLS))
    text = raw.decode(with_tools, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n# Tools\n" + json.dumps(TOOLS[0]))
    assert with_tools[-len(plain):] == plain


async def test_local_chat_template_kwargs_reach_the_template(tmp_path: Path, model_dir: Path, raw: Tokenizer) -> None:
    shutil.copy(model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    template = "{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = LocalTokenizer.from_dir(tmp_path)
    try:
        ids = await tok.tokenize(chat([{"role": "user", "content": "hi"}], chat_template_kwargs={"greeting": "Hello "}))
        assert ids == raw.encode("Hello hi", add_special_tokens=False).ids
    finally:
        await tok.close()


async def test_long_prompts_are_offloaded_with_identical_ids(local: LocalTokenizer, raw: Tokenizer) -> None:
    text = "A long shared system prompt about caching. " * 100
    assert len(text) >= local.min_chars_offload
    ids = await local.tokenize(completion(text))
    assert local.offloaded == 1
    assert ids == raw.encode(text).ids
    await local.tokenize(completion("short"))
    assert local.offloaded == 1


async def test_local_template_errors_are_bad_prompt(tmp_path: Path, model_dir: Path) -> None:
    shutil.copy(model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}x"}))
    tok = LocalTokenizer.from_dir(tmp_path)
    try:
        with pytest.raises(TokenizeFailed, match="user first") as info:
            await tok.tokenize(chat())
        assert info.value.reason == "bad_prompt"
    finally:
        await tok.close()


async def test_local_without_template_is_bad_prompt(tmp_path: Path, model_dir: Path) -> None:
    shutil.copy(model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = LocalTokenizer.from_dir(tmp_path)
    try:
        assert await tok.tokenize(completion("plain text works"))
        with pytest.raises(TokenizeFailed) as info:
            await tok.tokenize(chat())
        assert info.value.reason == "bad_prompt"
    finally:
        await tok.close()


def test_tokenize_body_shapes() -> None:
    assert tokenize_body(completion("hi")) == {"model": "tiny", "prompt": "hi", "add_special_tokens": True}
    assert tokenize_body(completion("hi", model=None)) == {"prompt": "hi", "add_special_tokens": True}
    assert tokenize_body(chat()) == {"model": "tiny", "messages": MESSAGES, "add_generation_prompt": True}
    full = tokenize_body(chat(tools=TOOLS, chat_template_kwargs={"enable_thinking": False},
                              add_generation_prompt=False))
    assert full == {"model": "tiny", "messages": MESSAGES, "add_generation_prompt": False, "tools": TOOLS,
                    "chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=TOK, assert_all_called=False) as mock:
        yield mock


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def _no_sleep(_: float) -> None:
    return None


def remote(http: httpx.AsyncClient, threshold: int = 5, attempts: int = 2, timeout: float = 0.5) -> RemoteTokenizer:
    return RemoteTokenizer(TOK + "/", http, timeout=timeout, retry=RetrySettings(attempts, 0.01, 0.01),
                           breaker=CircuitBreaker("tok", threshold, 60.0, 1), sleep=_no_sleep)


async def test_remote_chat_and_completion(http: httpx.AsyncClient, router: respx.MockRouter) -> None:
    route = router.post("/tokenize").mock(side_effect=[
        httpx.Response(200, json={"count": 3, "max_model_len": 8192, "tokens": [1, 2, 3]}),
        httpx.Response(200, json={"count": 2, "max_model_len": 8192, "tokens": [9, 8]})])
    tok = remote(http)
    assert await tok.tokenize(chat(tools=TOOLS)) == [1, 2, 3]
    assert json.loads(route.calls[0].request.content) == tokenize_body(chat(tools=TOOLS))
    assert await tok.tokenize(completion("hello")) == [9, 8]
    assert json.loads(route.calls[1].request.content) == {"model": "tiny", "prompt": "hello",
                                                          "add_special_tokens": True}


async def test_remote_retries_5xx_then_succeeds(http: httpx.AsyncClient, router: respx.MockRouter) -> None:
    route = router.post("/tokenize").mock(side_effect=[httpx.Response(503), httpx.Response(200, json={"tokens": [4]})])
    assert await remote(http).tokenize(completion("x")) == [4]
    assert route.call_count == 2


@pytest.mark.parametrize("answer, reason", [
    (httpx.Response(400, json={"error": "bad"}), "rejected"),
    (httpx.Response(404, json={"detail": "model not found"}), "rejected"),
    (httpx.Response(200, json={"count": 1}), "bad_answer"),
    (httpx.Response(200, json={"tokens": ["a"]}), "bad_answer"),
    (httpx.Response(200, text="<html>"), "bad_answer"),
    (httpx.ConnectError("refused"), "unavailable"),
    (httpx.Response(500), "unavailable"),
])
async def test_remote_failures_have_reasons(http: httpx.AsyncClient, router: respx.MockRouter,
                                            answer: Any, reason: str) -> None:
    router.post("/tokenize").mock(side_effect=[answer, answer])
    with pytest.raises(TokenizeFailed) as info:
        await remote(http).tokenize(chat())
    assert info.value.reason == reason


async def test_remote_timeout_then_breaker_opens(http: httpx.AsyncClient, router: respx.MockRouter) -> None:
    attempts = 0

    async def hang(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    router.post("/tokenize").mock(side_effect=hang)
    tok = remote(http, threshold=2, timeout=0.02)
    for _ in range(2):
        with pytest.raises(TokenizeFailed) as info:
            await tok.tokenize(chat())
        assert info.value.reason == "unavailable"
    assert tok.breaker.state is BreakerState.OPEN
    with pytest.raises(TokenizeFailed) as info:
        await tok.tokenize(chat())
    assert info.value.reason == "circuit_open"
    assert attempts == 2  # an open breaker sends nothing


def test_token_cache_ttl_and_bound() -> None:
    now = [0.0]
    cache = TokenCache(max_size=2, ttl=10.0, clock=lambda: now[0])
    cache.put("a", [1, 2, 3])
    assert cache.get("a") == [1, 2, 3]
    now[0] = 9.9
    assert cache.get("a") == [1, 2, 3]
    now[0] = 10.0
    assert cache.get("a") is None
    cache.put("b", [1])
    cache.put("c", [2])
    cache.put("d", [3])
    assert len(cache) == 2
    cache.put("neg", [-1])  # not storable compactly: skipped, not an error
    assert cache.get("neg") is None


def test_token_cache_disabled() -> None:
    cache = TokenCache(max_size=0, ttl=10.0)
    cache.put("a", [1])
    assert cache.get("a") is None and len(cache) == 0


def test_cache_key_covers_template_inputs() -> None:
    base = cache_key(chat())
    assert base == cache_key(chat())
    assert base != cache_key(chat(add_generation_prompt=False))
    assert base != cache_key(chat(chat_template_kwargs={"x": 1}))
    assert (cache_key(chat(chat_template_kwargs={"a": 1, "b": 2}))
            == cache_key(chat(chat_template_kwargs={"b": 2, "a": 1})))
    assert cache_key(completion("x")) != base


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
