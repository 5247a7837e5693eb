"""Review findings: bad input that used to crash a handler (500) or the engine now gets a 400."""

from __future__ import annotations

import asyncio
import queue
import shutil
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvtok.chat_tokens import ChatTokenizer
from mlxd.engine import Engine
from mlxd.engine_types import EngineClosed, EngineConfig, Event, GenParams, GenRequest, QueueFull
from mlxd.metrics import DaemonMetrics
from mlxd.openai_api import BadRequest, gen_params
from testbed.procs import free_port, start_kvgate
from tests.conftest import wait_until
from tests.mlxd.conftest import Daemon, start_daemon
from tests.mlxd.test_server import metric_values, post, sse_events

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


@pytest.mark.parametrize("seed", [-(2**63), 2**63 - 1, 0])
def test_int64_seeds_are_accepted(seed: int) -> None:
    assert gen_params({"seed": seed}, prompt_len=3, max_model_len=100, chat=False).seed == seed


@pytest.mark.parametrize("seed", [-(2**63) - 1, 2**64])
def test_seeds_beyond_int64_name_the_param(seed: int) -> None:
    with pytest.raises(BadRequest) as info:
        gen_params({"seed": seed}, prompt_len=3, max_model_len=100, chat=False)
    assert info.value.param == "seed"


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
        assert events[-2]["error"]["code"] == 503
        status, err = await whole
        assert status == 503 and err["error"]["type"] == "service_unavailable"
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


def test_requests_waiting_when_the_engine_thread_dies_get_an_error(tiny_model_dir: Path) -> None:
    """An exception escaping the engine loop used to end the thread silently: every queued
    request then waited forever."""
    tok = ChatTokenizer.from_dir(tiny_model_dir)
    engine = Engine(EngineConfig(tiny_model_dir, max_running=1), tok, DaemonMetrics("t"))
    engine.start()
    assert engine.ready.wait(60) and engine.alive
    events: dict[str, queue.SimpleQueue[Event]] = {"a": queue.SimpleQueue(), "b": queue.SimpleQueue()}
    reqs = {name: GenRequest([5, 6, 7], GenParams(max_tokens=5000, ignore_eos=True), q.put)
            for name, q in events.items()}
    engine.submit(reqs["a"])
    assert events["a"].get(timeout=30).kind == "token"  # a runs; b will wait for its slot
    engine.submit(reqs["b"])

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("MLX is gone")

    def kill(e: Engine) -> None:
        e._bg.next = broken  # the next step fails, and so does making a new batch
        e._rt.new_batch_generator = broken

    engine.call(kill).result(10)
    try:
        for name in ("a", "b"):
            kinds = []
            while not kinds or kinds[-1] == "token":
                kinds.append(events[name].get(timeout=10).kind)
            assert kinds[-1] == "error", name
        with pytest.raises(EngineClosed):
            engine.submit(GenRequest([5], GenParams(max_tokens=1), lambda e: None))
        assert not engine.alive and engine.load_error and "MLX is gone" in engine.load_error
    finally:
        engine.stop()


def test_explicit_nulls_mean_the_default_n_included() -> None:
    """Clients that serialise unset fields send `"n": null`; vLLM takes it as 1, we used to 400."""
    body = {"n": None, "seed": None, "stop": None, "max_tokens": None, "temperature": None, "top_p": None}
    params = gen_params(body, prompt_len=3, max_model_len=100, chat=False)
    assert params.max_tokens == 16 and params.temperature == 1.0 and params.seed is None


def test_max_waiting_counts_only_requests_beyond_the_free_batch_slots(tiny_model_dir: Path) -> None:
    """`--max-waiting 0` used to reject every request, even on an idle daemon: a request
    counted as waiting until the engine thread picked it up, free slots or not."""
    tok = ChatTokenizer.from_dir(tiny_model_dir)
    engine = Engine(EngineConfig(tiny_model_dir, max_running=2, max_waiting=0), tok, DaemonMetrics("t"))
    engine.start()
    assert engine.ready.wait(60) and engine.alive
    events: queue.SimpleQueue[Event] = queue.SimpleQueue()
    try:
        burst = [GenRequest([5, 6, 7 + i], GenParams(max_tokens=5000, ignore_eos=True), events.put)
                 for i in range(2)]
        for req in burst:  # both at once, before the engine thread has seen either
            engine.submit(req)
        seen = 0
        while seen < 2:
            seen += events.get(timeout=30).kind == "token"
        with pytest.raises(QueueFull):  # both slots busy, no waiting room
            engine.submit(GenRequest([9], GenParams(max_tokens=1), events.put))
        for req in burst:
            engine.cancel(req)
    finally:
        engine.stop()


async def _running(daemon: Daemon, n: int) -> bool:
    return (await metric_values(daemon))["vllm:num_requests_running"] == n
