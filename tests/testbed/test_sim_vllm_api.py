"""sim-vllm's HTTP surface: vLLM's schemas, SSE, tokenize, metrics and errors, on a real aiohttp server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from kvkernel.errors import error_type
from testbed.procs import free_port, start_kvgate
from testbed.sim_vllm.cache import PrefixCache
from testbed.sim_vllm.engine import Engine, EngineConfig
from testbed.sim_vllm.server import make_app
from testbed.sim_vllm.tokenizer import SimTokenizer, load_tokenizer
from tests.conftest import wait_until

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
SYSTEM = "You are a careful assistant. " * 120  # ~600 tokens


def _app(tokenizer: SimTokenizer | None = None, **overrides: Any) -> web.Application:
    config = EngineConfig(**{"prefill_rate": 50_000.0, "decode_rate": 2000.0, **overrides})
    tok = tokenizer or load_tokenizer(None)
    return make_app(
        Engine(config, tok, PrefixCache(config.block_size, config.capacity_blocks)),
        model="sim",
        instance_id="sim-1",
    )


@pytest.fixture
async def client(aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(_app())


def _events(raw: str) -> list[str]:
    """SSE payloads; asserts every event is a single `data:` line."""
    blocks = [b for b in raw.split("\n\n") if b]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), raw[:500]
    return [b.removeprefix("data: ") for b in blocks]


async def test_completion_reports_cached_tokens_on_a_repeated_prefix(client: Client) -> None:
    first = await (
        await client.post("/v1/completions", json={"prompt": SYSTEM + "Q1", "max_tokens": 4})
    ).json()
    second = await (
        await client.post("/v1/completions", json={"prompt": SYSTEM + "Q2", "max_tokens": 4})
    ).json()
    assert first["object"] == "text_completion" and first["model"] == "sim"
    assert first["choices"][0]["finish_reason"] == "length" and first["choices"][0]["text"]
    usage = second["usage"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert 0 < usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    assert (
        usage["total_tokens"]
        == usage["prompt_tokens"] + usage["completion_tokens"]
        == usage["prompt_tokens"] + 4
    )


@pytest.mark.parametrize(
    ("prompt", "choices"),
    [
        (["one two", "three four"], 2),
        ([5, 6, 7, 8], 1),
        ([[5, 6, 7], [8, 9]], 2),
    ],
)
async def test_completion_prompt_forms(client: Client, prompt: Any, choices: int) -> None:
    resp = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    body = await resp.json()
    assert resp.status == 200, body
    assert [c["index"] for c in body["choices"]] == list(range(choices))
    assert body["usage"]["completion_tokens"] == 2 * choices


async def test_chat_completion_shape(client: Client) -> None:
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "sim", "messages": messages, "max_completion_tokens": 3},
    )
    body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_sse_stream_matches_the_non_streamed_text(client: Client, path: str) -> None:
    chat = "chat" in path
    base: dict[str, Any] = (
        {"messages": [{"role": "user", "content": "stream me"}]}
        if chat
        else {"prompt": "stream me"}
    ) | {"max_tokens": 6}
    whole = await (await client.post(path, json=base)).json()
    resp = await client.post(
        path, json=base | {"stream": True, "stream_options": {"include_usage": True}}
    )
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = _events(await resp.text())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(
        c["object"] == ("chat.completion.chunk" if chat else "text_completion") for c in chunks
    )
    pieces = [
        c["choices"][0]["delta"].get("content", "") if chat else c["choices"][0]["text"]
        for c in chunks
        if c["choices"]
    ]
    expected = whole["choices"][0]["message"]["content"] if chat else whole["choices"][0]["text"]
    assert "".join(pieces) == expected
    if chat:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}, "the last token's chunk finishes"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0
    assert all("usage" not in c for c in chunks[:-1])


async def test_stream_without_include_usage_has_no_usage_chunk(client: Client) -> None:
    resp = await client.post(
        "/v1/completions", json={"prompt": "x y", "max_tokens": 2, "stream": True}
    )
    chunks = [json.loads(e) for e in _events(await resp.text())[:-1]]
    assert all(c["choices"] and "usage" not in c for c in chunks)


async def test_first_sse_chunk_arrives_while_still_generating(aiohttp_client: MakeClient) -> None:
    app = _app(decode_rate=20.0)
    client = await aiohttp_client(app)
    resp = await client.post(
        "/v1/completions", json={"prompt": "slow", "max_tokens": 20, "stream": True}
    )
    line = await resp.content.readline()
    assert line.startswith(b"data: ")
    state = await (await client.get("/sim/state")).json()
    assert state["running"] == 1, "the stream's first chunk came before generation finished"
    rest = (line + await resp.content.read()).decode()
    assert _events(rest)[-1] == "[DONE]"


async def test_client_disconnect_mid_stream_frees_its_sequence(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(_app(decode_rate=20.0, max_num_seqs=1))
    resp = await client.post("/v1/completions", json={"prompt": "long", "max_tokens": 200, "stream": True})
    assert (await resp.content.readline()).startswith(b"data: ")
    resp.close()
    async with asyncio.timeout(5):
        while (await (await client.get("/sim/state")).json())["running"]:  # noqa: ASYNC110 - polling a server with a deadline
            await asyncio.sleep(0.01)
    done = await (await client.post("/v1/completions", json={"prompt": "next", "max_tokens": 1})).json()
    assert done["usage"]["completion_tokens"] == 1


async def test_tokenize_gives_the_ids_the_engine_prefills(client: Client) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
    tok = await (await client.post("/tokenize", json={"messages": messages})).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 8192
    chat = await (
        await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
    ).json()
    assert chat["usage"]["prompt_tokens"] == tok["count"]
    # The same ids as a completion prompt hit everything the chat request cached.
    again = await (
        await client.post("/v1/completions", json={"prompt": tok["tokens"], "max_tokens": 1})
    ).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == (tok["count"] - 1) // 16 * 16


async def test_detokenize_round_trips_text(client: Client) -> None:
    text = "Hello, world! Tokens round-trip."
    tok = await (await client.post("/tokenize", json={"prompt": text})).json()
    back = await (await client.post("/detokenize", json={"tokens": tok["tokens"]})).json()
    assert back == {"prompt": text}


async def test_models_health_and_health_toggle(client: Client) -> None:
    models = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["sim"] and models["data"][0]["owned_by"] == "vllm"
    assert (await client.get("/health")).status == 200
    assert (await client.post("/sim/health", json={"healthy": False})).status == 200
    assert (await client.get("/health")).status == 503
    await client.post("/sim/health", json={"healthy": True})
    assert (await client.get("/health")).status == 200


def _metrics(text: str) -> dict[str, float]:
    """`name{labels}` (labels without engine/model_name) -> value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            key = (
                key.replace('engine="0",model_name="sim"', "").replace("{,", "{").replace("{}", "")
            )
            out[key] = float(value)
    return out


async def test_metrics_count_prefix_cache_tokens_and_ttft(client: Client) -> None:
    usages = []
    for suffix in ("a", "b", "c"):
        body = await (
            await client.post("/v1/completions", json={"prompt": SYSTEM + suffix, "max_tokens": 2})
        ).json()
        usages.append(body["usage"])
    m = _metrics(await (await client.get("/metrics")).text())
    assert m["vllm:prefix_cache_queries_total"] == sum(u["prompt_tokens"] for u in usages)
    assert (
        m["vllm:prefix_cache_hits_total"]
        == sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
        > 0
    )
    assert m["vllm:time_to_first_token_seconds_count"] == 3
    assert m['vllm:time_to_first_token_seconds_bucket{le="+Inf"}'] == 3
    assert m["vllm:generation_tokens_total"] == 6
    assert m["vllm:num_requests_running"] == m["vllm:num_requests_waiting"] == 0
    assert m["vllm:kv_cache_usage_perc"] == 0.0


async def test_metrics_show_waiting_and_running_requests(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(_app(max_num_seqs=1, decode_rate=50.0))
    tasks = [
        asyncio.create_task(
            client.post("/v1/completions", json={"prompt": f"p{i}", "max_tokens": 10})
        )
        for i in range(3)
    ]
    async with asyncio.timeout(5):
        while True:
            m = _metrics(await (await client.get("/metrics")).text())
            if m["vllm:num_requests_waiting"] == 2:
                break
    assert m["vllm:num_requests_running"] == 1 and m["vllm:kv_cache_usage_perc"] > 0
    for resp in await asyncio.gather(*tasks):
        assert resp.status == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/completions", b"{not json", 400, "malformed JSON"),
        ("/v1/completions", b"[1, 2]", 400, "must be an object"),
        ("/v1/completions", {"prompt": 5}, 400, "'prompt'"),
        ("/v1/completions", {"prompt": ""}, 400, "empty"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "3"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 9000}, 400, "maximum context length"),
        ("/v1/completions", {"prompt": "x", "model": "other"}, 404, "does not exist"),
        ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n=1"),
        ("/v1/completions", {"prompt": ["a", "b"], "stream": True}, 400, "one prompt"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "role"),
        ("/tokenize", {"prompt": 3}, 400, "prompt"),
        ("/detokenize", {"tokens": ["a"]}, 400, "tokens"),
    ],
)
async def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
    client: Client, path: str, body: Any, status: int, needle: str
) -> None:
    resp = await (
        client.post(path, data=body) if isinstance(body, bytes) else client.post(path, json=body)
    )
    error = (await resp.json())["error"]
    assert resp.status == status and error["type"] == error_type(status)  # kvgate's vocabulary, not vLLM's
    assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert (
        await client.post("/v1/completions", json={"prompt": "still up", "max_tokens": 1})
    ).status == 200


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlxd.tiny_model import main as make_tiny_model

    path = tmp_path_factory.mktemp("tiny-model")
    assert make_tiny_model([str(path), "--seed", "0"]) == 0
    return path


async def test_model_dir_tokenizer_matches_the_mlx_daemons_ids(
    aiohttp_client: MakeClient, tiny_model: Path
) -> None:
    from kvtok.chat_tokens import ChatTokenizer

    client = await aiohttp_client(_app(load_tokenizer(tiny_model)))
    reference = ChatTokenizer.from_dir(tiny_model)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a cache?"},
    ]
    chat = await (await client.post("/tokenize", json={"messages": messages})).json()
    assert chat["tokens"] == reference.encode_chat(messages)
    plain = await (await client.post("/tokenize", json={"prompt": "What is a cache?"})).json()
    assert plain["tokens"] == reference.encode_prompt("What is a cache?")
    body = await (
        await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3})
    ).json()
    assert (
        body["usage"]["prompt_tokens"] == chat["count"] and body["choices"][0]["message"]["content"]
    )


# ---- bad input is a 400, and the server keeps serving ----


CHAT = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}


async def _still_serving(client: Client) -> None:
    resp = await client.post("/v1/completions", json={"prompt": "still here", "max_tokens": 1})
    assert resp.status == 200


async def test_sim_deeply_nested_json_is_a_400(client: Client) -> None:
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp = await client.post("/v1/completions", data=deep, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
    await _still_serving(client)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"messages": 5}}),
    ("/tokenize", {"messages": CHAT["messages"], "chat_template_kwargs": {"messages": 5}}),
])
async def test_sim_unrenderable_chat_template_kwargs_are_a_400(client: Client, path: str,
                                                               body: dict[str, Any]) -> None:
    resp = await client.post(path, json=body)
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"]["param"] == "messages"
    await _still_serving(client)


# ---- a client that goes away frees its slot (a real process) ----


async def _sim_running(url: str) -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        state = (await client.get(url + "/sim/state")).json()
    return state["running"]


async def _is_running(url: str, n: int) -> bool:
    return await _sim_running(url) == n


async def test_sim_non_streaming_disconnect_frees_the_sequence_slot(tmp_path: Path) -> None:
    """vLLM aborts a request whose client went away; the sim used to keep decoding it,
    holding one of its `--max-num-seqs` slots until the last token."""
    port = free_port()
    proc = start_kvgate("sim-disc", ["sim-vllm", "--id", "sim-disc", "--port", str(port),
                                     "--max-num-seqs", "1", "--decode-rate", "20"], tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_http(url + "/health", timeout=30)
        async with httpx.AsyncClient(timeout=60) as client:
            task = asyncio.create_task(client.post(url + "/v1/completions",
                                                   json={"prompt": "hold the slot", "max_tokens": 2000}))
            await wait_until(lambda: _is_running(url, 1), timeout=10, message="the request running")
            task.cancel()  # closes the connection
            with pytest.raises(asyncio.CancelledError):
                await task
        await wait_until(lambda: _is_running(url, 0), timeout=10, message="the slot freed")
    finally:
        proc.stop()
