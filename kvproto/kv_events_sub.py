"""`KVEventSubscriber`: follow one publisher's KV-event stream (vLLM's or ours) from asyncio.

Contract, for a consumer keeping an index of the publisher's cache:

- `on_batch(batch)` is called for each decoded batch, in seq order, never twice
  for one seq of one publisher run.
- `on_reset()` is called before any batch that cannot be applied on top of what
  was delivered so far: after the connection dropped (the publisher may have
  restarted with an empty cache), when seq goes back (a restart not seen as a
  disconnect), and when a gap cannot be filled from the replay buffer. The
  consumer drops everything it holds for this publisher; what is delivered after
  a reset is then a subset of the publisher's real state (never stale).
- Gaps are filled by asking the replay socket for the missing range. On every
  (re)connection the subscriber also asks replay for everything from the next
  expected seq, so a late joiner catches up with the publisher's buffered history
  and nothing published before the subscription took effect is lost.
- A malformed message or payload is counted in `stats.malformed` and skipped;
  an exception from a callback is logged and counted; neither stops the loop.

Callbacks run on the event loop thread and must not block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvproto.kv_events import (
    END_SEQ,
    KVEventBatch,
    KVEventDecodeError,
    decode_batch,
    parse_seq,
    seq_bytes,
)

log = logging.getLogger("kvproto.kv_events")


@dataclass(slots=True)
class SubscriberStats:
    """Counters, for metrics and tests."""

    batches: int = 0  # delivered to on_batch (live + replayed)
    replayed: int = 0  # of which came from the replay socket
    duplicates: int = 0  # live batches already delivered by a catch-up replay
    gaps: int = 0  # missing ranges detected
    unrecoverable_gaps: int = 0
    resets: int = 0
    malformed: int = 0
    callback_errors: int = 0
    connects: int = 0
    disconnects: int = 0


class KVEventSubscriber:
    """SUB (+ DEALER for replay) client of one publisher. `await start()`, then `await close()`."""

    def __init__(self, endpoint: str, replay_endpoint: str | None, *,
                 on_batch: Callable[[KVEventBatch], None], on_reset: Callable[[], None],
                 topic: str = "", replay_timeout: float = 2.0) -> None:
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.replay_timeout = replay_timeout
        self._on_batch = on_batch
        self._on_reset = on_reset
        self.stats = SubscriberStats()
        self.last_seq = -1  # last seq delivered (or skipped as malformed); -1: none yet
        self._dup_until = -1  # live seqs <= this were already delivered by a catch-up
        # The connection dropped: reset when the next one is made. Messages still queued
        # from the old connection are applied normally before that.
        self._dirty = False
        self._ctx: zmq.asyncio.Context | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect (ZMQ reconnects by itself whenever the publisher comes back) and start the loop."""
        self._ctx = zmq.asyncio.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        self._monitor = self._sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._sub.connect(self.endpoint)
        self._task = asyncio.create_task(self._run(), name="kv-events-subscriber")

    async def close(self) -> None:
        """Stop the loop and close every socket; idempotent."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sub is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sub.disable_monitor()
        for sock in (self._monitor, self._sub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._monitor = self._sub = self._replay = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def _run(self) -> None:
        assert self._sub is not None and self._monitor is not None
        poller = zmq.asyncio.Poller()
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            ready = dict(await poller.poll())
            # Connection events first: a new connection's reset and catch-up must come
            # before its first live message is looked at.
            if self._monitor in ready:
                await self._drain_monitor()
            if self._sub in ready:
                await self._drain_sub()

    async def _drain_monitor(self) -> None:
        assert self._monitor is not None
        while await self._monitor.poll(0):
            event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self.stats.disconnects += 1
                self._dirty = True
            elif event == zmq.EVENT_CONNECTED:
                self.stats.connects += 1
                await self._catch_up()

    async def _drain_sub(self) -> None:
        assert self._sub is not None
        for _ in range(1000):  # bounded, so connection events are looked at between bursts
            try:
                frames = await self._sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            await self._on_message(frames)

    async def _on_message(self, frames: list[bytes]) -> None:
        if len(frames) != 3:
            self.stats.malformed += 1
            log.warning("kv-events: skipping a message of %d frames (want topic, seq, payload)", len(frames))
            return
        try:
            seq = parse_seq(frames[1])
        except KVEventDecodeError as exc:
            self.stats.malformed += 1
            log.warning("kv-events: skipping a message: %s", exc)
            return
        if seq <= self._dup_until:
            self.stats.duplicates += 1
            return
        self._dup_until = -1
        if seq <= self.last_seq:
            self._reset(f"seq went back from {self.last_seq} to {seq}")
        if seq > self.last_seq + 1:
            await self._fill(self.last_seq + 1, seq)
        self._deliver(seq, frames[2], replayed=False)

    def _reset(self, why: str) -> None:
        log.info("kv-events %s: reset (%s)", self.endpoint, why)
        self.stats.resets += 1
        self.last_seq = -1
        self._dup_until = -1
        self._dirty = False
        try:
            self._on_reset()
        except Exception:  # noqa: BLE001 - a consumer bug must not stop the stream
            self.stats.callback_errors += 1
            log.exception("kv-events: on_reset failed")

    def _deliver(self, seq: int, payload: bytes, *, replayed: bool) -> None:
        self.last_seq = seq
        try:
            batch = decode_batch(payload)
        except KVEventDecodeError as exc:
            self.stats.malformed += 1
            log.warning("kv-events: skipping seq %d: %s", seq, exc)
            return
        self.stats.batches += 1
        self.stats.replayed += replayed
        try:
            self._on_batch(batch)
        except Exception:  # noqa: BLE001 - a consumer bug must not stop the stream
            self.stats.callback_errors += 1
            log.exception("kv-events: on_batch failed for seq %d", seq)

    async def _catch_up(self) -> None:
        """After a (re)connection: reset if the connection had dropped, then replay everything buffered."""
        if self._dirty:
            self._reset("publisher reconnected")
        if self.replay_endpoint is None:
            return
        items = await self._request_replay(self.last_seq + 1)
        if items is not None and items:
            self._apply_replayed(self.last_seq + 1, None, items)
            self._dup_until = self.last_seq

    async def _fill(self, start: int, stop: int) -> None:
        """Deliver seqs [start, stop) from replay; reset first if they are not all there."""
        self.stats.gaps += 1
        items = await self._request_replay(start) if self.replay_endpoint is not None else None
        self._apply_replayed(start, stop, items or [])

    def _apply_replayed(self, start: int, stop: int | None, items: list[tuple[int, bytes]]) -> None:
        wanted = [(s, p) for s, p in items if s >= start and (stop is None or s < stop)]
        complete = [s for s, _ in wanted] == list(range(start, start + len(wanted)))
        if stop is not None:
            complete = complete and len(wanted) == stop - start
        if not complete:
            self.stats.unrecoverable_gaps += 1
            self._reset(f"seqs from {start} are no longer in the replay buffer")
        for seq, payload in wanted:
            if seq > self.last_seq:
                self._deliver(seq, payload, replayed=True)

    async def _request_replay(self, start: int) -> list[tuple[int, bytes]] | None:
        """Everything the publisher buffers from `start` on, or None if replay did not answer in time."""
        if self._replay is None:
            assert self._ctx is not None and self.replay_endpoint is not None
            self._replay = self._ctx.socket(zmq.DEALER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.setsockopt(zmq.RECONNECT_IVL, 100)
            self._replay.connect(self.replay_endpoint)
        try:
            async with asyncio.timeout(self.replay_timeout):
                return await self._replay_exchange(self._replay, start)
        except (TimeoutError, zmq.ZMQError) as exc:
            log.warning("kv-events %s: replay from %d failed: %r", self.replay_endpoint, start, exc)
            # A late answer would be read as the reply to the next request: start afresh.
            self._replay.close(linger=0)
            self._replay = None
            return None

    async def _replay_exchange(self, sock: zmq.asyncio.Socket, start: int) -> list[tuple[int, bytes]]:
        await sock.send_multipart((b"", seq_bytes(start)))
        items: list[tuple[int, bytes]] = []
        while True:
            frames = await sock.recv_multipart()
            body = frames[1:] if frames and frames[0] == b"" else frames
            if len(body) == 3:  # some vLLM versions repeat the topic in replay frames
                body = body[1:]
            if len(body) != 2:
                self.stats.malformed += 1
                continue
            try:
                seq = parse_seq(body[0])
            except KVEventDecodeError:
                self.stats.malformed += 1
                continue
            if seq == END_SEQ or not body[1]:
                return items
            items.append((seq, body[1]))
