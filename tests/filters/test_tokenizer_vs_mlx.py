"""Acceptance: the gateway's token ids equal what a real MLX daemon tokenizes and prefills.

One `kvgate mlx-serve` process (seeded tiny model, CPU) for the module. For each
completion and chat body (multi-message, tools, content parts, template kwargs):
local ids == the daemon's `/tokenize` == the remote backend's ids, and for
generation requests the daemon's `usage.prompt_tokens` equals the local count.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from filters.keys import Prompt
from filters.prompt import extract_prompt
from filters.tokenization import LocalTokenizer, RemoteTokenizer
from kvtok.chat_tokens import ChatTokenizer
from mlxd.tiny_model import write_model
from testbed.procs import free_port, start_kvgate
from tests.conftest import wait_until
from tests.gateway.harness import Stack, gateway_yaml, start_gateway

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."},
    {"role": "user", "content": "What is prefix caching?"},
    {"role": "assistant", "content": "Reusing the KV cache of a shared prompt prefix."},
    {"role": "user", "content": "Why does it matter for routing?"},
]
COMPLETIONS = [
    "Hello, world!",
    "  leading and trailing spaces  \n\nand blank lines\t",
    "Unicode: naïve café — 東京 🚀",
    "The gateway routes each request to the backend that holds its prefix. " * 40,
]
CHATS: list[dict[str, Any]] = [
    {"messages": CONVERSATION},
    {"messages": CONVERSATION, "tools": TOOLS},
    {"messages": CONVERSATION[:2], "add_generation_prompt": False},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "part one"},
                                               {"type": "text", "text": "part two"}]}]},
    {"messages": [*CONVERSATION[:2], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny, 21C"}], "tools": TOOLS},
    {"messages": CONVERSATION, "chat_template_kwargs": {"enable_thinking": False}},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="module")
def daemon(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_dir = tmp_path_factory.mktemp("logs")
    proc = start_kvgate("mlx", ["mlx-serve", "--model", str(model_dir), "--port", str(port),
                                "--served-model-name", "tiny"], log_dir)
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture
async def local(model_dir: Path) -> AsyncIterator[LocalTokenizer]:
    tok = LocalTokenizer.from_dir(model_dir, min_chars_offload=500)
    yield tok
    await tok.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def _prompt(path: str, body: dict[str, Any]) -> Prompt:
    found = extract_prompt(path, {"model": "tiny", **body})
    assert found is not None
    return found[0]


async def _daemon_tokenize(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> list[int]:
    response = await http.post(url + "/tokenize", json={"model": "tiny", **body})
    assert response.status_code == 200, response.text
    tokens: list[int] = response.json()["tokens"]
    return tokens


@pytest.mark.parametrize("text", COMPLETIONS)
async def test_completion_ids_match_daemon(daemon: str, local: LocalTokenizer, http: httpx.AsyncClient,
                                           text: str) -> None:
    prompt = _prompt("/v1/completions", {"prompt": text})
    ids = await local.tokenize(prompt)
    assert ids == await _daemon_tokenize(http, daemon, {"prompt": text, "add_special_tokens": True})
    assert ids == await RemoteTokenizer(daemon, http, timeout=10).tokenize(prompt)


@pytest.mark.parametrize("body", CHATS)
async def test_chat_ids_match_daemon(daemon: str, local: LocalTokenizer, http: httpx.AsyncClient,
                                     body: dict[str, Any]) -> None:
    prompt = _prompt("/v1/chat/completions", body)
    ids = await local.tokenize(prompt)
    daemon_body = {"add_generation_prompt": True, **body}
    assert ids == await _daemon_tokenize(http, daemon, daemon_body)
    assert ids == await RemoteTokenizer(daemon, http, timeout=10).tokenize(prompt)


async def test_local_count_equals_prefilled_prompt_tokens(daemon: str, local: LocalTokenizer,
                                                          http: httpx.AsyncClient) -> None:
    chat_body = {"messages": CONVERSATION, "tools": TOOLS}
    response = await http.post(daemon + "/v1/chat/completions",
                               json={"model": "tiny", "max_tokens": 1, "temperature": 0, **chat_body})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == len(await local.tokenize(
        _prompt("/v1/chat/completions", chat_body)))
    response = await http.post(daemon + "/v1/completions",
                               json={"model": "tiny", "max_tokens": 1, "temperature": 0, "prompt": COMPLETIONS[2]})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == len(await local.tokenize(
        _prompt("/v1/completions", {"prompt": COMPLETIONS[2]})))


# ---- through a live gateway ----


async def test_continue_final_message_is_prefilled_as_the_gateway_predicted(
        model_dir: Path, daemon: str, tmp_path: Path) -> None:
    """A prefill continuing a partial assistant message (vLLM's continue_final_message):
    the daemon must not close the turn, and the gateway must count what it prefills."""
    messages = [{"role": "user", "content": "Write a haiku about caches."},
                {"role": "assistant", "content": "Warm keys wait in"}]
    body = {"model": "tiny", "messages": messages, "add_generation_prompt": False, "continue_final_message": True,
            "max_tokens": 1, "temperature": 0}
    filters = f"  - type: tokenizer\n    config: {{backend: local, model_dir: \"{model_dir}\"}}\n"
    log_path = tmp_path / "access.jsonl"
    gateway = await start_gateway(gateway_yaml({"mlx": int(daemon.rsplit(":", 1)[1])}, log_path, extra_filters=filters))
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            tokenized = (await client.post(daemon + "/tokenize", json={
                k: body[k] for k in ("model", "messages", "add_generation_prompt", "continue_final_message")})).json()
            text = ChatTokenizer.from_dir(model_dir).decode(tokenized["tokens"])
            assert text.endswith("<|im_start|>assistant\nWarm keys wait in"), text
            response = await client.post(f"http://127.0.0.1:{gateway.port}/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
        stack = Stack(gateway, {}, {}, log_path)
        await wait_until(lambda: len(stack.access_log()) == 1, message="access-log line")
        line = stack.access_log()[0]
        assert line["prompt_tokens_local"] == line["prompt_tokens"] == tokenized["count"]
    finally:
        await gateway.close()
