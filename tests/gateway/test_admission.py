"""Admission control and connection limits: the gate alone, then a live gateway on
127.0.0.1 behind its guarded site (connection cap, slow heads, trickled bodies, idle
keep-alive), the in-flight queue, per-endpoint caps and 429 backpressure."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.admission import AdmissionGate, LimitsConfig
from gateway.app import create_app
from gateway.config import load_config_text
from gateway.listen import GuardedSite
from gateway.state import STATE_KEY
from testbed.fake_openai import FakeBackend
from tests.conftest import wait_until
from tests.gateway.adversarial_backend import EchoBackend, create_echo_app
from tests.gateway.harness import fake_stack, gateway_yaml, start_backend, start_gateway

COMPLETION = {"model": "fake-model", "prompt": "Once upon a time", "max_tokens": 8}
STREAM = {**COMPLETION, "stream": True}


async def test_gate_admits_queues_in_order_times_out_and_rejects_when_full() -> None:
    gate = AdmissionGate(LimitsConfig(max_inflight=1, max_queue=2, queue_timeout=0.3))
    assert await gate.enter()
    second = asyncio.create_task(gate.enter())
    third = asyncio.create_task(gate.enter())
    await wait_until(lambda: gate.queued == 2)
    assert await gate.enter() is False  # queue full: at once
    gate.leave()  # the slot passes to the first waiter
    assert await second is True and gate.active == 1
    assert await third is False  # waited queue_timeout
    assert gate.rejected == 2 and gate.queued == 0
    gate.leave()
    assert gate.active == 0


async def test_a_cancelled_waiter_leaves_the_queue_and_loses_no_slot() -> None:
    gate = AdmissionGate(LimitsConfig(max_inflight=1, max_queue=4, queue_timeout=5))
    assert await gate.enter()
    waiter = asyncio.create_task(gate.enter())
    await wait_until(lambda: gate.queued == 1)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert gate.queued == 0
    gate.leave()
    assert gate.active == 0 and await gate.enter()


@asynccontextmanager
async def served(yaml_text: str) -> AsyncIterator[int]:
    """A gateway served like `kvgate serve` serves it (AppRunner + GuardedSite): its port."""
    app = create_app(load_config_text(yaml_text))
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = GuardedSite(runner, app[STATE_KEY].config.server.limits, "127.0.0.1", 0)
    await site.start()
    try:
        yield site.port
    finally:
        await runner.cleanup()


@asynccontextmanager
async def guarded_gateway(tmp_path: Path, limits: str, cluster: str = "") -> AsyncIterator[tuple[int, FakeBackend]]:
    fake = FakeBackend("a")
    backend = await start_backend(fake)
    text = gateway_yaml({"a": backend.port}, tmp_path / "access.jsonl", server=f", limits: {{{limits}}}",
                        cluster=cluster)
    try:
        async with served(text) as port:
            yield port, fake
    finally:
        await backend.close()


async def test_a_client_that_stops_reading_stalls_the_backend_through_the_guard(tmp_path: Path) -> None:
    """The guard passes aiohttp's write flow control on: the gateway holds a bounded amount."""
    backend = EchoBackend("a")
    backend.mode, backend.stream_total = "big_stream", 512 * 1024 * 1024
    server = TestServer(create_echo_app(backend), host="127.0.0.1")
    await server.start_server()
    try:
        async with served(gateway_yaml({"a": server.port}, tmp_path / "access.jsonl")) as port, \
                aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=COMPLETION) as resp:
                await resp.content.readexactly(65536)
                last = -1
                for _ in range(200):  # poll until the backend's progress stops, with a deadline
                    if backend.written == last:
                        break
                    last = backend.written
                    await asyncio.sleep(0.05)
                assert backend.written == last and backend.written < 64 * 1024 * 1024
                resp.close()
    finally:
        await server.close()


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def closed_by_server(reader: asyncio.StreamReader, within: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (fails if it does not)."""
    return await asyncio.wait_for(reader.read(), within)


async def test_connections_beyond_the_cap_get_a_503_and_are_closed(tmp_path: Path) -> None:
    async with guarded_gateway(tmp_path, "max_connections: 2") as (port, _):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await closed_by_server(reader)
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_connections"
        for _, w in held:
            await close(w)
        await close(writer)
        async with aiohttp.ClientSession() as session:  # freed slots serve again
            await wait_until(lambda: _get_ok(session, port), message="a freed connection slot")


async def _get_ok(session: aiohttp.ClientSession, port: int) -> bool:
    try:
        async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def test_slowloris_heads_and_idle_connections_are_closed(tmp_path: Path) -> None:
    async with guarded_gateway(tmp_path, "header_timeout: 300ms, keepalive_timeout: 300ms") as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        assert await closed_by_server(reader) == b""
        await close(writer)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await closed_by_server(reader)  # answered, then closed once idle
        await close(writer)
        assert answer.startswith(b"HTTP/1.1 200")


async def test_a_trickled_body_gets_a_408_and_the_connection_closes(tmp_path: Path) -> None:
    async with guarded_gateway(tmp_path, "body_timeout: 300ms") as (port, fake):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\":")
        answer = await closed_by_server(reader)
        await close(writer)
        assert answer.startswith(b"HTTP/1.1 408") and b'"body_timeout"' in answer
        assert fake.requests == []


async def test_requests_beyond_max_inflight_queue_then_get_503_with_retry_after(tmp_path: Path) -> None:
    fake = FakeBackend("a")
    backend = await start_backend(fake)
    limits = ", limits: {max_inflight: 1, max_queue: 1, queue_timeout: 300ms}"
    gw = await start_gateway(gateway_yaml({"a": backend.port}, tmp_path / "q.jsonl", server=limits))
    url = f"http://127.0.0.1:{gw.port}/v1/completions"
    fake.stream_gate = asyncio.Event()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=STREAM) as held:  # holds the only slot
                assert held.status == 200
                queued = asyncio.create_task(session.post(url, json=COMPLETION))
                await wait_until(lambda: gw.app[STATE_KEY].inflight == 2)
                async with session.post(url, json=COMPLETION) as full:
                    assert full.status == 503 and full.headers["Retry-After"] == "1"
                    assert (await full.json())["error"]["code"] == "overloaded"
                timed_out = await queued
                assert timed_out.status == 503  # waited queue_timeout in the queue
                timed_out.release()
                fake.stream_gate.set()
                await held.read()
            async with session.post(url, json=COMPLETION) as resp:  # the slot is free again
                assert resp.status == 200
            base = f"http://127.0.0.1:{gw.port}"
            async with session.get(base + "/kvgate/status") as resp:
                assert (await resp.json())["admission"] == {"active": 0, "limit": 1, "queued": 0, "rejected": 2}
            async with session.get(base + "/metrics") as resp:
                assert "kvgate_admission_rejected 2.0" in await resp.text()
        assert len(fake.requests) == 2
    finally:
        await gw.close()
        await backend.close()


async def test_an_endpoint_at_its_inflight_cap_is_not_chosen(tmp_path: Path) -> None:
    async with fake_stack(tmp_path, n=1, cluster="\n    max_inflight_per_endpoint: 1") as st, \
            aiohttp.ClientSession() as session:
        st.backends["a"].stream_gate = asyncio.Event()
        async with session.post(st.url + "/v1/completions", json=STREAM) as held:
            assert held.status == 200
            async with session.post(st.url + "/v1/completions", json=COMPLETION) as resp:
                assert resp.status == 503 and (await resp.json())["error"]["code"] == "endpoints_saturated"
            st.backends["a"].stream_gate.set()
            await held.read()
        async with session.post(st.url + "/v1/completions", json=COMPLETION) as resp:
            assert resp.status == 200


async def test_429_is_backpressure_tried_elsewhere_without_the_breaker(tmp_path: Path) -> None:
    async with fake_stack(tmp_path) as st, aiohttp.ClientSession() as session:
        st.backends["a"].status = 429
        for _ in range(6):
            async with session.post(st.url + "/v1/completions", json=COMPLETION) as resp:
                assert resp.status == 200 and resp.headers["x-kvgate-endpoint"] == "b"
        endpoint = st.state.clusters["llm"].endpoint("a")
        assert endpoint is not None and endpoint.breaker.state.value == "closed"
        assert not endpoint.outlier.ejected() and len(st.backends["a"].requests) == 6  # tried first every time
