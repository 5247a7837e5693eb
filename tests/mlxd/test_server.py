"""The MLX daemon over HTTP: a real `kvgate mlx-serve` process with the seeded tiny model."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mlxd.tiny_tokenizer import corpus_text
from testbed.procs import free_port, start_kvgate
from tests.conftest import wait_until
from tests.mlxd.conftest import Daemon, start_daemon

GREEDY = {"temperature": 0, "ignore_eos": True}


async def post(daemon: Daemon, path: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(daemon.url + path, json=body) as r:
        return r.status, await r.json()


async def metric_values(daemon: Daemon) -> dict[str, float]:
    """Sample name -> value (labels dropped; the daemon serves one model)."""
    async with aiohttp.ClientSession() as s, s.get(daemon.url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith(("_bucket", "_created")):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


async def sse_events(resp: aiohttp.ClientResponse) -> list[Any]:
    events = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_completion_returns_text_and_usage(daemon: Daemon) -> None:
    status, body = await post(daemon, "/v1/completions", {"prompt": "Hello, world", "max_tokens": 6, **GREEDY})
    assert status == 200
    assert body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "length"
    assert isinstance(body["choices"][0]["text"], str) and body["choices"][0]["text"]
    usage = body["usage"]
    _, tok = await post(daemon, "/tokenize", {"prompt": "Hello, world"})
    assert usage["prompt_tokens"] == tok["count"]
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == tok["count"] + 6
    assert "cached_tokens" in usage["prompt_tokens_details"]


async def test_greedy_completion_is_deterministic(daemon: Daemon) -> None:
    body = {"prompt": "The gateway sits in front", "max_tokens": 8, **GREEDY}
    first, second = await asyncio.gather(post(daemon, "/v1/completions", body),
                                         post(daemon, "/v1/completions", body))
    assert first[1]["choices"][0]["text"] == second[1]["choices"][0]["text"]


async def test_chat_prefills_exactly_the_tokenize_ids(daemon: Daemon) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why cache?"}]
    status, body = await post(daemon, "/v1/chat/completions", {"messages": messages, "max_tokens": 4, **GREEDY})
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    _, tok = await post(daemon, "/tokenize", {"messages": messages, "add_generation_prompt": True})
    assert body["usage"]["prompt_tokens"] == tok["count"]
    _, text = await post(daemon, "/detokenize", {"tokens": tok["tokens"]})
    assert text["prompt"] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhy cache?<|im_end|>\n"
                              "<|im_start|>assistant\n")


async def test_chat_stream_is_sse_with_done_and_usage(daemon: Daemon) -> None:
    body = {"messages": [{"role": "user", "content": "Stream, please."}], "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}, **GREEDY}
    async with aiohttp.ClientSession() as s, s.post(daemon.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = await sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    _, whole = await post(daemon, "/v1/chat/completions", {**body, "stream": False})
    assert streamed == whole["choices"][0]["message"]["content"]


async def test_completion_stream_without_usage(daemon: Daemon) -> None:
    body = {"prompt": "Numbers such as", "max_tokens": 3, "stream": True, **GREEDY}
    async with aiohttp.ClientSession() as s, s.post(daemon.url + "/v1/completions", json=body) as r:
        events = await sse_events(r)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


async def test_stop_string_ends_generation_without_the_stop_text(daemon: Daemon) -> None:
    _, free = await post(daemon, "/v1/completions", {"prompt": "Hello", "max_tokens": 12, **GREEDY})
    text = free["choices"][0]["text"]
    stop = text[3:6]
    assert stop.strip(), f"need a visible stop string from {text!r}"
    _, stopped = await post(daemon, "/v1/completions", {"prompt": "Hello", "max_tokens": 12, "stop": [stop], **GREEDY})
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["text"] == text[: text.index(stop)]


async def test_tokenize_detokenize_round_trip(daemon: Daemon) -> None:
    text = "Prefix caches: 256 tokens per chunk — naïve café 漢字 🙂"
    status, tok = await post(daemon, "/tokenize", {"prompt": text, "add_special_tokens": True})
    assert status == 200
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 8192
    _, back = await post(daemon, "/detokenize", {"tokens": tok["tokens"]})
    assert back["prompt"] == text


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": 5}, None),
    ("/v1/chat/completions", {"messages": []}, None),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, None),
    ("/v1/completions", {"prompt": "x", "model": "not-this-one"}, "model"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
])
async def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(
        daemon: Daemon, path: str, body: dict[str, Any], param: str | None) -> None:
    status, err = await post(daemon, path, body)
    assert status in (400, 404)
    assert err["error"]["message"] and err["error"]["param"] == param
    status, _ = await post(daemon, "/v1/completions", {"prompt": "still here", "max_tokens": 1, **GREEDY})
    assert status == 200


async def test_invalid_json_body_is_400(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s, s.post(daemon.url + "/v1/completions", data=b"{nope") as r:
        assert r.status == 400
        assert "JSON" in (await r.json())["error"]["message"]


async def test_models_and_health(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(daemon.url + "/v1/models") as r:
            models = await r.json()
        async with s.get(daemon.url + "/health") as r:
            assert r.status == 200
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 8192


async def test_concurrent_requests_are_all_answered(daemon: Daemon) -> None:
    bodies = [{"prompt": f"Request number {i} asks about caching", "max_tokens": 8, **GREEDY} for i in range(10)]
    results = await asyncio.gather(*(post(daemon, "/v1/completions", b) for b in bodies))
    assert [status for status, _ in results] == [200] * 10
    assert all(body["usage"]["completion_tokens"] == 8 for _, body in results)


async def test_shared_long_prefix_is_reused_and_counted(daemon: Daemon) -> None:
    system = (corpus_text() * 2)[:5000]
    first = [{"role": "system", "content": system}, {"role": "user", "content": "What is a prefix cache?"}]
    second = [{"role": "system", "content": system}, {"role": "user", "content": "Who pins entries?"}]
    _, ids1 = await post(daemon, "/tokenize", {"messages": first})
    _, ids2 = await post(daemon, "/tokenize", {"messages": second})
    shared = next(i for i, (a, b) in enumerate(zip(ids1["tokens"], ids2["tokens"], strict=False)) if a != b)
    assert shared >= 1000
    before = await metric_values(daemon)
    _, r1 = await post(daemon, "/v1/chat/completions", {"messages": first, "max_tokens": 2, **GREEDY})
    _, r2 = await post(daemon, "/v1/chat/completions", {"messages": second, "max_tokens": 2, **GREEDY})
    after = await metric_values(daemon)
    assert r1["usage"]["prompt_tokens_details"]["cached_tokens"] < shared
    assert r2["usage"]["prompt_tokens_details"]["cached_tokens"] == shared
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    queries = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    assert hits >= shared
    assert queries == ids1["count"] + ids2["count"]


async def test_metrics_parse_with_vllm_names(daemon: Daemon) -> None:
    await post(daemon, "/v1/completions", {"prompt": "metrics", "max_tokens": 2, **GREEDY})
    values = await metric_values(daemon)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:generation_tokens_total"):
        assert name in values, name
    assert values["vllm:time_to_first_token_seconds_count"] >= 1
    assert 0.0 < values["vllm:kv_cache_usage_perc"] <= 1.0


async def test_client_disconnect_frees_the_slot(daemon: Daemon) -> None:
    body = {"prompt": "Keep talking", "max_tokens": 8000, "stream": True, **GREEDY}
    before = await metric_values(daemon)
    async with aiohttp.ClientSession() as s:
        resp = await s.post(daemon.url + "/v1/completions", json=body)
        await resp.content.readline()  # first event arrived: the request is generating
        resp.close()  # drop the connection mid-stream
    await wait_until(lambda: _running_is_zero(daemon), timeout=10, message="slot freed")
    after = await metric_values(daemon)
    finished = "vllm:request_success_total"
    assert after[finished] == before[finished], "the request finished instead of being cancelled"


async def _running_is_zero(daemon: Daemon) -> bool:
    return (await metric_values(daemon))["vllm:num_requests_running"] == 0


async def test_non_streaming_client_disconnect_cancels_generation(daemon: Daemon) -> None:
    body = {"prompt": "Go on and on", "max_tokens": 8000, **GREEDY}
    before = await metric_values(daemon)
    task = asyncio.create_task(post(daemon, "/v1/completions", body))
    await wait_until(lambda: _running_is(daemon, 1), timeout=10, message="request running")
    task.cancel()  # closes the client connection
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: _running_is(daemon, 0), timeout=10, message="slot freed")
    after = await metric_values(daemon)
    assert after["vllm:request_success_total"] == before["vllm:request_success_total"]


async def _running_is(daemon: Daemon, n: int) -> bool:
    return (await metric_values(daemon))["vllm:num_requests_running"] == n


async def test_seeded_sampling_is_reproducible(daemon: Daemon) -> None:
    body = {"prompt": "Once", "max_tokens": 12, "temperature": 1.5, "ignore_eos": True}
    texts = [(await post(daemon, "/v1/completions", {**body, "seed": seed}))[1]["choices"][0]["text"]
             for seed in (11, 11, 12)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


async def test_prompt_is_reusable_while_its_request_still_decodes(daemon: Daemon) -> None:
    system = "Decoding still. " + (corpus_text() * 2)[:4000]
    first = [{"role": "system", "content": system}, {"role": "user", "content": "Talk for long."}]
    second = [{"role": "system", "content": system}, {"role": "user", "content": "Short one."}]
    _, ids1 = await post(daemon, "/tokenize", {"messages": first})
    _, ids2 = await post(daemon, "/tokenize", {"messages": second})
    shared = next(i for i, (a, b) in enumerate(zip(ids1["tokens"], ids2["tokens"], strict=False)) if a != b)
    async with aiohttp.ClientSession() as s:
        long_body = {"messages": first, "max_tokens": 7000, "stream": True, **GREEDY}
        resp = await s.post(daemon.url + "/v1/chat/completions", json=long_body)
        data_lines = 0
        while data_lines < 2:  # the role chunk, then the first token: prefill is done
            data_lines += (await resp.content.readline()).startswith(b"data: ")
        _, quick = await post(daemon, "/v1/chat/completions", {"messages": second, "max_tokens": 2, **GREEDY})
        resp.close()
    assert quick["usage"]["prompt_tokens_details"]["cached_tokens"] == shared


# ---- bad input is a 400, and the daemon keeps serving ----


OK = {"prompt": "still here", "max_tokens": 1, "temperature": 0}


async def _still_serving(daemon: Daemon) -> None:
    status, body = await post(daemon, "/v1/completions", OK)
    assert status == 200, body


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "x", "model": ["tiny"]}, "model"),
    ("/tokenize", {"prompt": "x", "model": {"a": 1}}, "model"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "seed": 2**70}, "seed"),
    ("/v1/completions", {"prompt": "x", "max_completion_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": "false"}, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                              "ignore_eos": 1}, "ignore_eos"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}],
                              "max_tokens": 2}, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                              "chat_template_kwargs": {"messages": 5}}, None),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"messages": 5}}, None),
])
async def test_bad_field_is_a_400_not_a_500(daemon: Daemon, path: str, body: dict[str, Any],
                                             param: str | None) -> None:
    status, err = await post(daemon, path, body)
    assert status == 400, err
    assert err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"] == param
    await _still_serving(daemon)


async def test_negative_int64_seed_samples_reproducibly(daemon: Daemon) -> None:
    body = {"prompt": "Once", "max_tokens": 6, "temperature": 1.2, "ignore_eos": True, "seed": -7}
    first, second = await post(daemon, "/v1/completions", body), await post(daemon, "/v1/completions", body)
    assert first[0] == second[0] == 200, first
    assert first[1]["choices"][0]["text"] == second[1]["choices"][0]["text"]


async def test_deeply_nested_json_is_a_400(daemon: Daemon) -> None:
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    async with aiohttp.ClientSession() as s, s.post(daemon.url + "/v1/completions", data=deep,
                                                    headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        assert "JSON" in (await r.json())["error"]["message"]
    await _still_serving(daemon)


# ---- shutdown and a failed model load (own daemons) ----


async def _running(daemon: Daemon, n: int) -> bool:
    return (await metric_values(daemon))["vllm:num_requests_running"] == n


async def test_sigterm_ends_an_in_flight_stream_with_an_error_and_done(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """It used to be cut off mid-stream (no `[DONE]`) when aiohttp's shutdown timeout ran out."""
    d = start_daemon(tiny_model_dir, tmp_path, "mlx-sigterm")
    try:
        body = {"prompt": "Go on", "max_tokens": 8000, "stream": True, "temperature": 0, "ignore_eos": True}
        async with aiohttp.ClientSession() as s, s.post(d.url + "/v1/completions", json=body) as r:
            assert (await r.content.readline()).startswith(b"data: ")  # generating
            whole = asyncio.create_task(post(d, "/v1/completions", {**body, "stream": False}))
            await wait_until(lambda: _running(d, 2), timeout=10, message="both requests running")
            d.proc.signal(signal.SIGTERM)
            events = await sse_events(r)
        assert events[-1] == "[DONE]"
        assert "shutting down" in events[-2]["error"]["message"]
        assert events[-2]["error"]["code"] == "engine_unavailable"
        assert events[-2]["error"]["type"] == "server_error"
        status, err = await whole
        assert status == 503 and err["error"]["type"] == "server_error"
        assert d.proc.proc is not None and d.proc.proc.wait(15) == 0
    finally:
        d.proc.kill()


async def test_a_daemon_whose_model_fails_to_load_answers_instead_of_hanging(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """/cache/stats waited forever on an engine thread that had already exited."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    port = free_port()
    proc = start_kvgate("mlx-broken", ["mlx-serve", "--model", str(broken), "--port", str(port)], tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async def load_failed() -> bool:
                try:
                    async with s.get(url + "/health") as r:
                        return r.status == 503 and (await r.json())["status"] == "error"
                except aiohttp.ClientError:
                    return False

            await wait_until(load_failed, timeout=60, message="the model load to fail")
            async with s.get(url + "/cache/stats") as r:
                assert r.status in (200, 503)
            async with s.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as r:
                assert r.status == 503
    finally:
        proc.kill()
