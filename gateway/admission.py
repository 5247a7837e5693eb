"""Admission control and connection limits (`server.limits`).

- `max_inflight` proxied requests at once per gateway process; beyond it a request
  waits in a bounded FIFO queue (`max_queue`) for at most `queue_timeout`, then gets
  a 503 with `Retry-After`. A full queue answers at once.
- `max_connections` open client connections per process: one more gets a 503 with
  `Retry-After` and is closed, before anything of it is read.
- `header_timeout`: a new connection must deliver its first request head in time;
  `keepalive_timeout` (aiohttp's own, which starts at the connection's start too)
  bounds idle connections and the heads of later requests; `body_timeout` bounds
  reading a request body (a 408). See docs/operations.md.

`AdmissionGate` and `ConnectionGuard` import nothing of the gateway but the kernel.
"""

from __future__ import annotations

import asyncio
import collections
import json
from dataclasses import dataclass
from typing import Any, cast

from kvkernel.decode import FieldError, Seconds
from kvkernel.errors import error_body


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_connections: int | None = 4096
    max_inflight: int | None = None  # None: no cap (the queue is then never used)
    max_queue: int = 1024
    queue_timeout: Seconds = 10.0
    header_timeout: Seconds = 10.0
    body_timeout: Seconds = 60.0
    keepalive_timeout: Seconds = 75.0

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_inflight"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FieldError(name, f"must be >= 1 (or null for no limit), got {value}")
        if self.max_queue < 0:
            raise FieldError("max_queue", f"must be >= 0, got {self.max_queue}")
        for name in ("queue_timeout", "header_timeout", "body_timeout", "keepalive_timeout"):
            if getattr(self, name) <= 0:
                raise FieldError(name, "must be > 0")


class AdmissionGate:
    """At most `max_inflight` holders; up to `max_queue` waiters, FIFO, each for at most
    `queue_timeout`. `enter()` is True when admitted (then `leave()` exactly once)."""

    def __init__(self, config: LimitsConfig) -> None:
        self.limit = config.max_inflight
        self.max_queue = config.max_queue
        self.queue_timeout = config.queue_timeout
        self.active = 0
        self.rejected = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def stats(self) -> dict[str, int | None]:
        return {"active": self.active, "limit": self.limit, "queued": self.queued, "rejected": self.rejected}

    def try_enter(self) -> bool:
        """Admitted at once (a free slot, nobody waiting), without awaiting anything?"""
        if self.limit is None or (self.active < self.limit and not self._waiters):
            self.active += 1
            return True
        return False

    async def enter(self) -> bool:
        if self.try_enter():
            return True
        if len(self._waiters) >= self.max_queue:
            self.rejected += 1
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter  # leave() hands its slot over: `active` already counts it
            return True
        except BaseException as exc:  # timed out, or the client went away
            self._withdraw(waiter)
            if isinstance(exc, TimeoutError):
                self.rejected += 1
                return False
            raise

    def _withdraw(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done() and not waiter.cancelled():
            self.leave()  # granted just as we gave up: pass the slot on
            return
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def leave(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the next waiter, `active` unchanged
                return
        self.active -= 1


def _overloaded_response(message: str) -> bytes:
    body = json.dumps(error_body(503, message, code="too_many_connections")).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class ConnectionGuard:
    """Wraps aiohttp's protocol factory (`runner.server`): caps open connections and
    closes a connection that has not sent its first request head in `header_timeout`."""

    def __init__(self, factory: Any, config: LimitsConfig) -> None:
        self._factory = factory
        self.config = config
        self.open = 0
        self.refused = 0
        self.timed_out = 0

    def __call__(self) -> asyncio.Protocol:
        return _GuardedProtocol(self, self._factory())


class _GuardedProtocol(asyncio.Protocol):
    """Delegates to aiohttp's RequestHandler; watches only connection start, the end of
    the first request head (`\\r\\n\\r\\n`) and connection loss."""

    def __init__(self, guard: ConnectionGuard, inner: Any) -> None:
        self._guard, self._inner = guard, inner
        self._counted = False
        self._tail = b""
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None

    # asyncio.Protocol defines these as no-ops: each must reach aiohttp's handler explicitly
    # (write flow control, half-closed connections).
    def pause_writing(self) -> None:
        if self._counted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._counted:
            self._inner.resume_writing()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._counted else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        # A stream transport whatever the loop: uvloop's TCPTransport is not an asyncio.Transport
        # subclass (an isinstance check here refused every connection under uvloop).
        stream = self._transport = cast(asyncio.Transport, transport)
        limit = guard.config.max_connections
        if limit is not None and guard.open >= limit:
            guard.refused += 1
            stream.write(_overloaded_response(f"too many connections (limit {limit})"))
            stream.close()
            return
        guard.open += 1
        self._counted = True
        self._timer = asyncio.get_running_loop().call_later(guard.config.header_timeout, self._head_too_slow)
        self._inner.connection_made(transport)

    def _head_too_slow(self) -> None:
        self._timer = None
        self._guard.timed_out += 1
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self._counted:
            return
        if self._timer is not None:
            window = self._tail + data
            if b"\r\n\r\n" in window:
                self._timer.cancel()
                self._timer = None
            self._tail = window[-3:]
        self._inner.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted:
            self._counted = False
            self._guard.open -= 1
            self._inner.connection_lost(exc)
