"""`KVEventPublisher`: vLLM's ZMQ KV-event publisher (PUB + ROUTER replay), for asyncio programs.

Wire (see `kvproto.kv_events`): PUB multipart `(topic, seq, payload)`, seq from 0
per publisher start. Replay: a client (a DEALER sending an empty delimiter frame
first) sends the 8-byte start seq to the ROUTER socket and receives one
`(b"", seq, payload)` message per buffered batch with seq >= start, then
`(b"", END_SEQ, b"")`. A REQ client gets only the first of these messages (its
state machine wants one reply per request), as with vLLM's publisher.

Why no thread (vLLM uses one): a PUB socket never blocks on send (past the high
water mark it drops for the slow subscriber, which then replays), and encoding a
few blocks' events is microseconds, so `publish` sends inline on the event loop
thread; replay requests are served by one asyncio task on a `zmq.asyncio` ROUTER
socket. Every socket and the ring buffer are touched only by the loop thread, so
no locks; `publish` called from another thread (the MLX engine thread) hops to the
loop with `call_soon_threadsafe`, keeping order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import zmq
import zmq.asyncio

from kvproto.kv_events import (
    END_SEQ,
    EVENT_FORMATS,
    EventFormat,
    KVEvent,
    KVEventBatch,
    encode_batch,
    parse_seq,
    seq_bytes,
)

log = logging.getLogger("kvproto.kv_events")


def bound_port(sock: zmq.Socket[bytes] | zmq.asyncio.Socket) -> int:
    """The TCP port a socket bound to (useful after binding port 0)."""
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return int(endpoint.rsplit(":", 1)[1])


class KVEventPublisher:
    """Publishes KVEventBatches; keeps the last `buffer_steps` payloads for replay.

    Lifecycle: `await start()` (binds; `port`/`replay_port` then hold the bound
    ports), any number of `publish(...)`, `await close()`. Also an async context
    manager. Not restartable.
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1:0", replay_endpoint: str | None = "tcp://127.0.0.1:0",
                 *, topic: str = "", buffer_steps: int = 10_000, hwm: int = 100_000,
                 data_parallel_rank: int | None = 0, event_format: EventFormat = "map",
                 clock: Callable[[], float] = time.time) -> None:
        if event_format not in EVENT_FORMATS:
            raise ValueError(f"event_format must be one of {EVENT_FORMATS}, got {event_format!r}")
        if buffer_steps < 1:
            raise ValueError(f"buffer_steps must be >= 1, got {buffer_steps}")
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.data_parallel_rank = data_parallel_rank
        self.event_format: EventFormat = event_format
        self._clock = clock
        self._hwm = hwm
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._next_seq = 0
        self._ctx: zmq.asyncio.Context | None = None
        self._pub: zmq.asyncio.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self.port: int | None = None
        self.replay_port: int | None = None

    @property
    def next_seq(self) -> int:
        """The seq the next published batch gets (= batches published so far)."""
        return self._next_seq

    async def start(self) -> None:
        """Bind both sockets and start serving replay. Raises zmq.ZMQError if an endpoint cannot bind."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._ctx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.set_hwm(self._hwm)
        self._pub.bind(self.endpoint)
        self.port = bound_port(self._pub) if self.endpoint.startswith("tcp://") else None
        if self.replay_endpoint is not None:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(self.replay_endpoint)
            self.replay_port = bound_port(self._replay) if self.replay_endpoint.startswith("tcp://") else None
            self._task = asyncio.create_task(self._serve_replay(), name="kv-events-replay")

    def publish(self, events: Sequence[KVEvent]) -> None:
        """Send one batch of `events` (in order). Never blocks; a no-op for an empty list or before start.

        Safe from any thread: off the loop thread the send is scheduled on the loop.
        """
        if not events or self._pub is None or self._loop is None:
            return
        batch = KVEventBatch(self._clock(), tuple(events), self.data_parallel_rank)
        if threading.get_ident() == self._loop_thread:
            self._send(batch)
        else:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                self._loop.call_soon_threadsafe(self._send, batch)

    def _send(self, batch: KVEventBatch) -> None:
        if self._pub is None:
            return
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        payload = encode_batch(batch, self.event_format)
        self._buffer.append((seq, payload))
        try:
            self._pub.send_multipart((self.topic, seq_bytes(seq), payload), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # subscribers recover the batch by replay
            log.warning("kv-events: publishing seq %d failed: %s", seq, exc)

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            try:
                await self._answer_replay(frames)
            except (zmq.ZMQError, ValueError) as exc:
                log.warning("kv-events: replay request failed: %s", exc)

    async def _answer_replay(self, frames: list[bytes]) -> None:
        """Frames are (identity, b"", start_seq) from REQ or from a DEALER that sends the delimiter."""
        assert self._replay is not None
        if len(frames) != 3 or frames[1]:
            log.warning("kv-events: ignoring malformed replay request of %d frames", len(frames))
            return
        client, _, start_frame = frames
        start = parse_seq(start_frame)
        for seq, payload in list(self._buffer):
            if seq >= start:
                await self._replay.send_multipart((client, b"", seq_bytes(seq), payload))
        await self._replay.send_multipart((client, b"", seq_bytes(END_SEQ), b""))

    async def close(self) -> None:
        """Stop serving replay and close the sockets (pending sends are dropped)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._replay = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def __aenter__(self) -> KVEventPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
