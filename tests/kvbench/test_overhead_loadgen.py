"""The overhead benchmark's load generator against real aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from kvbench.loadgen import HttpError, LoadgenProcess, LoadJob, build_request, parse_head, run_load


async def fixed(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response({"echo": body["n"]})


async def chunked(request: web.Request) -> web.StreamResponse:
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(3):
        await resp.write(f"data: {i}\n\n".encode())
    await resp.write_eof()
    return resp


async def failing(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"error": "no"}, status=503)


async def closing(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(text="bye", headers={"Connection": "close"})


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_post("/fixed", fixed)
    app.router.add_post("/chunked", chunked)
    app.router.add_post("/failing", failing)
    app.router.add_post("/closing", closing)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    yield srv
    await srv.close()


def url(srv: TestServer, path: str) -> str:
    return f"http://127.0.0.1:{srv.port}{path}"


async def test_fixed_length_answers_are_counted_and_timed(server: TestServer) -> None:
    result = await run_load(LoadJob(url(server, "/fixed"), {"n": 7}, concurrency=4, count=25))
    assert (result.requests, result.errors) == (25, 0)
    assert len(result.latency_ms) == 25 and all(x > 0 for x in result.latency_ms)
    assert result.bytes_in == 25 * len(b'{"echo": 7}')
    assert result.elapsed_s > 0


async def test_chunked_streams_are_read_to_the_end_with_ttfb_before_completion(server: TestServer) -> None:
    result = await run_load(LoadJob(url(server, "/chunked"), {}, concurrency=3, count=9))
    assert (result.requests, result.errors) == (9, 0)
    assert result.bytes_in == 9 * sum(len(f"data: {i}\n\n") for i in range(3))
    assert all(0 < t <= lat for t, lat in zip(result.ttfb_ms, result.latency_ms, strict=True))


async def test_error_statuses_count_as_errors_not_answers(server: TestServer) -> None:
    result = await run_load(LoadJob(url(server, "/failing"), {}, concurrency=2, count=6))
    assert (result.requests, result.errors) == (0, 6)
    assert result.error_samples[0] == "status 503"


async def test_connection_close_answers_reconnect(server: TestServer) -> None:
    result = await run_load(LoadJob(url(server, "/closing"), {}, concurrency=2, count=8))
    assert (result.requests, result.errors) == (8, 0)


async def test_a_dead_port_is_reported_as_errors() -> None:
    srv = TestServer(web.Application(), host="127.0.0.1")
    await srv.start_server()
    port = srv.port
    await srv.close()
    result = await run_load(LoadJob(f"http://127.0.0.1:{port}/x", {}, concurrency=2, count=4))
    assert (result.requests, result.errors) == (0, 4)


async def test_a_stalled_server_hits_the_per_request_timeout() -> None:
    gate = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        await gate.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_post("/stall", stall)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    try:
        result = await run_load(LoadJob(url(srv, "/stall"), {}, concurrency=1, count=1, timeout_s=0.2))
    finally:
        gate.set()
        await srv.close()
    assert result.errors == 1 and "TimeoutError" in result.error_samples[0]


def test_request_bytes_and_head_parsing() -> None:
    host, port, raw = build_request("http://127.0.0.1:9/v1/completions?a=1", b'{"x":1}')
    assert (host, port) == ("127.0.0.1", 9)
    assert raw.startswith(b"POST /v1/completions?a=1 HTTP/1.1\r\n") and raw.endswith(b'\r\n\r\n{"x":1}')
    assert b"Content-Length: 7\r\n" in raw
    status, headers = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: b")
    assert status == 200 and headers == {"content-length": "3", "x-a": "b"}
    with pytest.raises(HttpError):
        parse_head(b"garbage")
    with pytest.raises(ValueError):
        build_request("https://127.0.0.1/x", b"")


async def test_the_child_process_runs_jobs_and_returns_large_results(server: TestServer) -> None:
    loadgen = LoadgenProcess().start()
    try:
        # thousands of timings make a reply far larger than a pipe's buffer
        result = await asyncio.to_thread(loadgen.run, LoadJob(url(server, "/fixed"), {"n": 1}, 8, 3000))
        again = await asyncio.to_thread(loadgen.run, LoadJob(url(server, "/fixed"), {"n": 2}, 2, 10))
        with pytest.raises(RuntimeError, match="load generator failed"):
            await asyncio.to_thread(loadgen.run, LoadJob(url(server, "/fixed"), {}, 0, 1))
    finally:
        loadgen.close()
    assert (result.requests, result.errors, len(result.latency_ms)) == (3000, 0, 3000)
    assert (again.requests, again.errors) == (10, 0)
