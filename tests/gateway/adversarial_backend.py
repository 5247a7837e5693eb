"""Test-only upstreams that misbehave on purpose, all on 127.0.0.1.

`EchoBackend` is a real aiohttp app that records exactly what reached it (method,
raw path, headers, body) and answers in a mode the test picks: JSON echo, a slow
head, a gzip-encoded body, a huge stream, or a stream cut off mid-way.
`RawBackend` is a plain asyncio TCP server for answers aiohttp would never send
(malformed HTTP, oversized headers).
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

ECHO_KEY = web.AppKey("echo_backend", "EchoBackend")
GZIP_BODY = gzip.compress(json.dumps({"object": "text_completion", "choices": [{"text": "z" * 2000}]}).encode(),
                          mtime=0)


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class EchoBackend:
    name: str
    mode: str = "echo"  # echo | gzip | big_stream | cut_stream | cut_length | multi_header
    head_delay: float = 0.0
    head_gate: asyncio.Event | None = None  # if set, the head waits for it
    stream_total: int = 0  # bytes for big_stream
    chunk: int = 65536
    written: int = 0  # bytes the big stream has handed to the socket so far
    started: asyncio.Event = field(default_factory=asyncio.Event)  # a generation request arrived
    seen: list[Seen] = field(default_factory=list)
    metrics_text: str = ""  # served at /metrics
    transports: list[asyncio.Transport] = field(default_factory=list)  # connections of generation requests


async def _handle(request: web.Request) -> web.StreamResponse:
    be = request.app[ECHO_KEY]
    if request.path == "/health":
        return web.Response(text="ok")
    if request.path == "/metrics":
        return web.Response(text=be.metrics_text, content_type="text/plain")
    if request.transport is not None:
        be.transports.append(request.transport)  # type: ignore[arg-type]
    body = await request.read()
    be.seen.append(Seen(request.method, request.raw_path, dict(request.headers), body))
    be.started.set()
    if be.head_delay:
        await asyncio.sleep(be.head_delay)
    if be.head_gate is not None:
        await be.head_gate.wait()
    handler = _MODES[be.mode]
    return await handler(request, be)


async def _echo(request: web.Request, be: EchoBackend) -> web.StreamResponse:
    return web.json_response({"backend": be.name, "method": request.method, "raw_path": request.raw_path},
                             headers={"x-backend-id": be.name})


async def _gzip(request: web.Request, be: EchoBackend) -> web.StreamResponse:
    return web.Response(body=GZIP_BODY, headers={"Content-Encoding": "gzip", "Content-Type": "application/json",
                                                 "x-backend-id": be.name})


async def _multi_header(request: web.Request, be: EchoBackend) -> web.StreamResponse:
    """Repeated response headers (two cookies, two Link values), as a load balancer might add."""
    resp = web.json_response({"backend": be.name})
    for value in ("a=1; Path=/", "b=2; Path=/"):
        resp.headers.add("Set-Cookie", value)
    for value in ("<https://x/1>; rel=next", "<https://x/2>; rel=prev"):
        resp.headers.add("Link", value)
    return resp


async def _big_stream(request: web.Request, be: EchoBackend) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    await resp.prepare(request)
    block = b"x" * be.chunk
    while be.written < be.stream_total:
        await resp.write(block)  # awaits drain: stalls when nobody downstream reads
        be.written += len(block)
    await resp.write_eof()
    return resp


async def _cut_stream(request: web.Request, be: EchoBackend) -> web.StreamResponse:
    """A chunked SSE stream whose connection drops after the second event."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b"data: one\n\n")
    await resp.write(b"data: two\n\n")
    assert request.transport is not None
    request.transport.abort()
    return resp


async def _cut_length(request: web.Request, be: EchoBackend) -> web.StreamResponse:
    """Announces Content-Length 1000, sends 10 bytes, drops the connection."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.content_length = 1000
    await resp.prepare(request)
    await resp.write(b'{"partial"')
    assert request.transport is not None
    request.transport.abort()
    return resp


_MODES: dict[str, Callable[[web.Request, EchoBackend], Awaitable[web.StreamResponse]]] = {
    "echo": _echo, "gzip": _gzip, "big_stream": _big_stream, "cut_stream": _cut_stream,
    "cut_length": _cut_length, "multi_header": _multi_header,
}


def create_echo_app(be: EchoBackend) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[ECHO_KEY] = be
    app.router.add_route("*", "/{tail:.*}", _handle)
    return app


class RawBackend:
    """A TCP server on 127.0.0.1 that reads one request head and writes `reply` verbatim."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.requests = 0
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> RawBackend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = _content_length(head)
            if length:
                await reader.readexactly(length)
            self.requests += 1
            writer.write(self.reply)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class StaleKeepAliveBackend(RawBackend):
    """Answers the first request on each connection (keep-alive), then closes the connection when
    the next request arrives on it: what a backend's idle keep-alive timeout looks like to a
    client whose pooled connection raced the close."""

    def __init__(self) -> None:
        super().__init__(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        self.dropped = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for answered in (True, False):
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(_content_length(head))
                if not answered:
                    self.dropped += 1
                    break
                self.requests += 1
                writer.write(self.reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def json_of(data: bytes) -> Any:
    return json.loads(data)
