"""Token accounting: the gateway asks for usage the client did not, strips the extra chunk
(the client's bytes are what it would get without the gateway), logs and counts tokens."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.usage import _EVENT, USAGE_ADDED, UsageChunkStripper, _events, ask_for_usage
from kvkernel.context import RequestContext
from testbed.fake_openai import FakeBackend
from testbed.sim_vllm.cache import PrefixCache
from testbed.sim_vllm.engine import Engine, EngineConfig
from testbed.sim_vllm.server import make_app
from testbed.sim_vllm.tokenizer import load_tokenizer
from tests.conftest import wait_until
from tests.gateway.harness import Stack, gateway_yaml, start_backend, start_gateway

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi there"}], "stream": True}
COMPLETION = {"model": "fake-model", "prompt": "Once upon a time", "max_tokens": 8, "stream": True}


def _ctx(body: dict[str, Any] | None, path: str = "/v1/chat/completions", method: str = "POST") -> RequestContext:
    ctx = RequestContext("r", method, path)
    ctx.json = body
    return ctx


@pytest.mark.parametrize("body,added", [
    ({"stream": True}, {"include_usage": True}),
    ({"stream": True, "stream_options": {"include_usage": False}}, {"include_usage": True}),
    ({"stream": True, "stream_options": {"x": 1}}, {"x": 1, "include_usage": True}),
    ({"stream": True, "stream_options": {"include_usage": True}}, None),  # asked already: untouched
    ({"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}, None),
    ({"stream": True, "stream_options": "bad"}, None),  # the backend answers the client's mistake
    ({"stream": False}, None),  # non-streamed answers carry usage anyway
    ({}, None),
])
def test_ask_for_usage_only_for_streams_that_lack_it(body: dict[str, Any], added: dict[str, Any] | None) -> None:
    ctx = _ctx(dict(body))
    assert ask_for_usage(ctx) is (added is not None)
    assert (ctx.json or {}).get("stream_options") == (added if added is not None else body.get("stream_options"))
    assert ctx.get(USAGE_ADDED) is (True if added else None)
    assert not ask_for_usage(_ctx(dict(body), path="/v1/embeddings"))


CLIENT_EVENTS = [b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n',
                 b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"\\"usage\\""}}]}\n\n',
                 b"data: [DONE]\n\n"]
USAGE_EVENT = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'


@pytest.mark.parametrize("piece", [1, 7, 10_000])
def test_stripper_drops_only_the_usage_chunk_however_the_bytes_arrive(piece: int) -> None:
    upstream = b"".join(CLIENT_EVENTS[:2]) + USAGE_EVENT + CLIENT_EVENTS[2]
    strip = UsageChunkStripper()
    out = b"".join(strip.feed(upstream[i:i + piece]) for i in range(0, len(upstream), piece)) + strip.flush()
    assert out == b"".join(CLIENT_EVENTS) and strip.stripped == 1


def test_stripper_removes_openai_style_null_usage_and_keeps_crlf_events() -> None:
    strip = UsageChunkStripper()
    event = b'data: {"id":"c","choices":[{"index":0}],"usage":null}\r\n\r\n'
    assert strip.feed(event) == b'data: {"id":"c","choices":[{"index":0}]}\r\n\r\n'
    assert strip.feed(USAGE_EVENT.replace(b"\n", b"\r\n")) == b""


@pytest.mark.parametrize("data", [
    b"", b"data: a\n\n", b"data: a\n\ndata: b\n\n", b"data: a\n\n\ndata: b\n\n", b"data: a\n\n\n",
    b"data: a\r\n\r\ndata: b\n\n", b"data: a\r\rdata: b\r\n\r\n", b": comment\n\ndata: [DONE]\n\n",
])
def test_events_are_cut_as_the_event_pattern_cuts_them(data: bytes) -> None:
    assert _events(data) == [match.group() for match in _EVENT.finditer(data)]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    fakes = {"a": FakeBackend("a", cached_tokens=2)}
    servers = {eid: await start_backend(f) for eid, f in fakes.items()}
    log_path = tmp_path / "access.jsonl"
    gw = await start_gateway(gateway_yaml({e: s.port for e, s in servers.items()}, log_path))
    yield Stack(gw, fakes, servers, log_path)
    await gw.close()
    for server in servers.values():
        await server.close()


async def _post(url: str, path: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, json=body, headers=headers) as resp:
            return resp.status, await resp.read()


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
async def test_stream_without_include_usage_is_learned_and_stripped(stack: Stack, path: str,
                                                                    body: dict[str, Any]) -> None:
    backend = f"http://127.0.0.1:{stack.servers['a'].port}"
    direct = (await _post(backend, path, body))[1]
    status, via_gateway = await _post(stack.url, path, body)
    assert status == 200 and via_gateway == direct and b'"usage"' not in via_gateway
    assert stack.backends["a"].requests[-1]["stream_options"] == {"include_usage": True}
    await wait_until(lambda: len(stack.access_log()) == 1)
    line = stack.access_log()[0]
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] == 4 and line["cached_tokens"] == 2
    assert line["bytes"] == len(direct)
    assert "predicted_cached_tokens" in line


async def test_stream_with_include_usage_is_forwarded_untouched(stack: Stack) -> None:
    body = {**CHAT, "stream_options": {"include_usage": True}}
    raw = json.dumps(body, indent=1).encode()  # not how the gateway would serialise it
    async with aiohttp.ClientSession() as session:
        async with session.post(stack.url + "/v1/chat/completions", data=raw,
                                headers={"Content-Type": "application/json"}) as resp:
            out = await resp.read()
    assert b'"choices": [], "usage"' in out  # the client asked: it gets the usage chunk
    assert stack.backends["a"].requests[-1] == body
    await wait_until(lambda: len(stack.access_log()) == 1)
    assert stack.access_log()[0]["completion_tokens"] == 4


async def test_token_counters_and_latency_histograms(stack: Stack) -> None:
    for _ in range(2):
        assert (await _post(stack.url, "/v1/chat/completions", CHAT))[0] == 200
    assert (await _post(stack.url, "/v1/chat/completions", {**CHAT, "stream": False}))[0] == 200
    async with aiohttp.ClientSession() as session:
        async with session.get(stack.url + "/metrics") as resp:
            text = await resp.text()
    labels = '{cluster="llm",endpoint="a",model="fake-model"}'
    assert f"kvgate_completion_tokens_total{labels} 12.0" in text
    assert f"kvgate_cached_tokens_total{labels} 6.0" in text
    prompt = [line for line in text.splitlines() if line.startswith(f"kvgate_prompt_tokens_total{labels}")]
    assert prompt and float(prompt[0].split()[-1]) > 0
    # TTFT and time per output token: streams only (2 of the 3 requests).
    assert 'kvgate_time_to_first_token_seconds_count{cluster="llm",model="fake-model"} 2.0' in text
    assert 'kvgate_time_per_output_token_seconds_count{cluster="llm",model="fake-model"} 2.0' in text


# --- sim-vllm: real vLLM-shaped streams --------------------------------------------------


@pytest.fixture
async def sim_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    config = EngineConfig(prefill_rate=50_000.0, decode_rate=2000.0)
    engine = Engine(config, load_tokenizer(None), PrefixCache(config.block_size, config.capacity_blocks))
    server = TestServer(make_app(engine, model="sim", instance_id="sim-1"), host="127.0.0.1")
    await server.start_server()
    log_path = tmp_path / "access.jsonl"
    gw = await start_gateway(gateway_yaml({"sim": server.port}, log_path))
    yield Stack(gw, {}, {"sim": server}, log_path)
    await gw.close()
    await server.close()


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "sim", "messages": [{"role": "user", "content": "tell me"}],
                              "max_tokens": 6, "stream": True}),
    ("/v1/completions", {"model": "sim", "prompt": "tell me a story", "max_tokens": 6, "stream": True}),
])
async def test_sim_vllm_stream_bytes_equal_direct(sim_stack: Stack, path: str, body: dict[str, Any]) -> None:
    backend = f"http://127.0.0.1:{sim_stack.servers['sim'].port}"
    for attempt in range(3):  # the chunks carry `created` (seconds): retry across a second boundary
        rid = {"x-request-id": f"same-id-{attempt}"}
        direct = (await _post(backend, path, body, rid))[1]
        status, via_gateway = await _post(sim_stack.url, path, body, rid)
        if via_gateway == direct:
            break
    assert status == 200 and via_gateway == direct and b'"usage"' not in direct
    await wait_until(lambda: len(sim_stack.access_log()) >= 1)
    line = sim_stack.access_log()[-1]
    assert line["completion_tokens"] == 6 and line["prompt_tokens"] > 0 and line["cached_tokens"] is not None
