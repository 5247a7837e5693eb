"""Review findings for the testbed servers: bad input that used to be a 500 is a 400."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq
import zmq.asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient

from kvproto.chunks import chunk_keys
from kvproto.worker import WorkerReporter
from testbed.mock_lmcache.harness import (
    ControllerProcess,
    RecordingHandler,
    start_mock_controller,
    wait_for_layout,
)
from testbed.procs import free_port, kvgate_cmd, start_kvgate
from testbed.sim_vllm.cache import PrefixCache as SimPrefixCache
from testbed.sim_vllm.engine import Engine, EngineConfig, RequestResult
from testbed.sim_vllm.tokenizer import HashTokenizer
from tests.conftest import wait_until
from tests.testbed.test_mock_lmcache_contract import controller  # noqa: F401 - the mock/real fixture
from tests.testbed.test_sim_vllm_api import _app

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
CHAT = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}


@pytest.fixture
async def client(aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(_app())


async def _still_serving(client: Client) -> None:
    resp = await client.post("/v1/completions", json={"prompt": "still here", "max_tokens": 1})
    assert resp.status == 200


async def test_sim_deeply_nested_json_is_a_400(client: Client) -> None:
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp = await client.post("/v1/completions", data=deep, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "BadRequestError"
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


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _poll(predicate: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            return value
        time.sleep(0.05)
    return value


def test_sigterm_to_kvgate_demo_stops_the_servers_it_started(tmp_path: Path) -> None:
    """SIGTERM used to kill the demo at once, leaving its servers (own sessions) running."""
    demo = subprocess.Popen(kvgate_cmd("demo", "--keep", str(tmp_path), "--users", "1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: set[int] = set()
    try:
        children = _poll(lambda: _children(demo.pid), timeout=60)
        assert children, "the demo started no server"
        demo.send_signal(signal.SIGTERM)
        demo.wait(30)
        left = _poll(lambda: not any(_alive(p) for p in children), timeout=20)
        assert left, f"servers left running after the demo exited: {sorted(p for p in children if _alive(p))}"
    finally:
        demo.kill()
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_controller_answers_a_deeply_nested_body_with_400_detail(controller: ControllerProcess) -> None:  # noqa: F811
    """FastAPI (the real controller) answers 400 {"detail"}; the mock used to answer a text 500."""
    deep = b'{"tokens": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp = httpx.post(controller.url + "/lookup", content=deep, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert resp.json() == {"detail": "There was an error parsing the body"}
    assert httpx.post(controller.url + "/lookup", json={"tokens": [1, 2]}).status_code == 200


async def test_mock_pull_loop_survives_a_deeply_nested_json_frame(tmp_path: Path) -> None:
    """The frame's RecursionError used to end the mock's pull loop: no admit counted after it."""
    ctl = start_mock_controller(tmp_path)
    ctx = zmq.asyncio.Context()
    rep = WorkerReporter(controller_host="127.0.0.1", ports=ctl.ports, instance_id="deep",
                         handler=RecordingHandler(), heartbeat_interval=0.5)
    try:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(f"tcp://127.0.0.1:{ctl.ports['pull']}")
        await push.send(b'{"type": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        await rep.start()
        assert await rep.wait_registered(10)
        tokens = list(range(7, 7 + 512))
        rep.admit(chunk_keys(tokens))
        async with httpx.AsyncClient(base_url=ctl.url, timeout=10) as client:
            await wait_for_layout(client, tokens, {"deep": ["LocalCPUBackend", 512]})
    finally:
        await rep.close()
        ctx.destroy(linger=0)
        ctl.stop()


async def _sim_running(url: str) -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        state = (await client.get(url + "/sim/state")).json()
    return state["running"]


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


async def _is_running(url: str, n: int) -> bool:
    return await _sim_running(url) == n


async def test_sim_kv_cache_usage_counts_a_running_request_s_blocks_once() -> None:
    """A running request's prompt blocks were counted twice: once as cached blocks it
    references and again in its private reservation, so usage read about double."""
    config = EngineConfig(block_size=16, capacity_blocks=1000, prefill_rate=1e6, decode_rate=50.0)
    engine = Engine(config, HashTokenizer(), SimPrefixCache(config.block_size, config.capacity_blocks))
    prompt, max_tokens = list(range(800)), 16  # 50 full prompt blocks; 51 blocks with the output
    result = RequestResult(len(prompt))
    async with aclosing(engine.generate(prompt, max_tokens, result)) as tokens:
        await anext(tokens)  # prefilled and decoding
        assert engine.kv_cache_usage() == pytest.approx(51 / 1000)
    assert engine.kv_cache_usage() == 0
