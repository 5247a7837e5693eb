"""KVEventPublisher and KVEventSubscriber over real ZMQ sockets on 127.0.0.1.

Lossy scenarios use `ScriptedPublisher`, an independent few-line implementation of
vLLM's framing (XPUB, so the test knows when the subscription is live, plus a
ROUTER answering replay from a buffer the test controls).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import zmq
import zmq.asyncio

from kvproto.kv_events import (
    END_SEQ,
    AllBlocksCleared,
    BlockStored,
    KVEventBatch,
    encode_batch,
    seq_bytes,
)
from kvproto.kv_events_pub import KVEventPublisher, bound_port
from kvproto.kv_events_sub import KVEventSubscriber
from testbed.procs import free_ports


async def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def payload(seq: int) -> bytes:
    """A batch whose ts is its seq, so the log shows what arrived."""
    return encode_batch(KVEventBatch(float(seq), (AllBlocksCleared(),), 0))


class Recorder:
    """on_batch/on_reset that log 'reset' and the ts of each batch."""

    def __init__(self) -> None:
        self.log: list[Any] = []

    def on_batch(self, batch: KVEventBatch) -> None:
        self.log.append(batch.ts)

    def on_reset(self) -> None:
        self.log.append("reset")

    def subscriber(self, port: int, replay_port: int | None) -> KVEventSubscriber:
        replay = f"tcp://127.0.0.1:{replay_port}" if replay_port else None
        return KVEventSubscriber(f"tcp://127.0.0.1:{port}", replay, on_batch=self.on_batch,
                                 on_reset=self.on_reset, replay_timeout=2.0)


class ScriptedPublisher:
    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.bind("tcp://127.0.0.1:0")
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind("tcp://127.0.0.1:0")
        self.port, self.replay_port = bound_port(self.pub), bound_port(self.router)
        self.buffer: dict[int, bytes] = {}
        self.replay_requests: list[int] = []
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            first = int.from_bytes(start, "big")
            for seq in sorted(s for s in self.buffer if s >= first):
                await self.router.send_multipart((client, b"", seq_bytes(seq), self.buffer[seq]))
            await self.router.send_multipart((client, b"", seq_bytes(END_SEQ), b""))
            self.replay_requests.append(first)

    async def wait_subscribed(self) -> None:
        async with asyncio.timeout(10):
            assert (await self.pub.recv())[0] == 1

    async def send(self, *frames: bytes) -> None:
        await self.pub.send_multipart(frames)

    async def close(self) -> None:
        self.task.cancel()
        self.pub.close(linger=0)
        self.router.close(linger=0)
        self.ctx.term()


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedPublisher, Recorder, KVEventSubscriber]]:
    """A connected subscriber whose catch-up replay (of an empty buffer) is done."""
    pub, rec = ScriptedPublisher(), Recorder()
    sub = rec.subscriber(pub.port, pub.replay_port)
    await sub.start()
    await pub.wait_subscribed()
    await wait_for(lambda: pub.replay_requests == [0], "the catch-up replay")
    yield pub, rec, sub
    await sub.close()
    await pub.close()


async def test_gap_is_filled_from_replay(scripted: tuple[ScriptedPublisher, Recorder, KVEventSubscriber]) -> None:
    pub, rec, sub = scripted
    pub.buffer = {s: payload(s) for s in range(3)}
    await pub.send(b"", seq_bytes(0), payload(0))
    await pub.send(b"", seq_bytes(2), payload(2))  # seq 1 lost on the way
    await wait_for(lambda: len(rec.log) == 3, "three batches")
    assert rec.log == [0.0, 1.0, 2.0]
    assert pub.replay_requests == [0, 1]
    assert (sub.stats.gaps, sub.stats.replayed, sub.stats.resets) == (1, 1, 0)


async def test_unrecoverable_gap_resets_before_newer_events(
        scripted: tuple[ScriptedPublisher, Recorder, KVEventSubscriber]) -> None:
    pub, rec, sub = scripted
    await pub.send(b"", seq_bytes(0), payload(0))
    pub.buffer = {s: payload(s) for s in (2, 3)}  # seq 1 already fell out of the ring
    await pub.send(b"", seq_bytes(3), payload(3))
    await wait_for(lambda: 3.0 in rec.log, "seq 3")
    assert rec.log == [0.0, "reset", 2.0, 3.0]
    assert (sub.stats.unrecoverable_gaps, sub.stats.resets) == (1, 1)


async def test_gap_without_replay_endpoint_resets() -> None:
    pub, rec = ScriptedPublisher(), Recorder()
    sub = rec.subscriber(pub.port, None)
    await sub.start()
    try:
        await pub.wait_subscribed()
        await pub.send(b"", seq_bytes(0), payload(0))
        await pub.send(b"", seq_bytes(5), payload(5))
        await wait_for(lambda: 5.0 in rec.log, "seq 5")
        assert rec.log == [0.0, "reset", 5.0]
    finally:
        await sub.close()
        await pub.close()


async def test_seq_going_back_means_a_restart(scripted: tuple[ScriptedPublisher, Recorder, KVEventSubscriber]) -> None:
    pub, rec, sub = scripted
    for seq in (0, 1, 0):
        await pub.send(b"", seq_bytes(seq), payload(seq))
    await wait_for(lambda: len(rec.log) == 4, "the restarted stream")
    assert rec.log == [0.0, 1.0, "reset", 0.0]


async def test_malformed_messages_are_counted_and_skipped(
        scripted: tuple[ScriptedPublisher, Recorder, KVEventSubscriber]) -> None:
    pub, rec, sub = scripted
    await pub.send(b"", seq_bytes(0), payload(0))
    await pub.send(b"", seq_bytes(1), b"\x93\xc1junk")
    await pub.send(b"", b"short", payload(9))
    await pub.send(b"", payload(9))
    await pub.send(b"", seq_bytes(2), encode_batch(KVEventBatch(2.0, (BlockStored((1,), None, (1,), 1),))))
    await wait_for(lambda: 2.0 in rec.log, "seq 2")
    assert rec.log == [0.0, 2.0]
    assert (sub.stats.malformed, sub.stats.gaps, sub.stats.resets) == (3, 0, 0)


async def test_callback_errors_do_not_stop_the_stream(
        scripted: tuple[ScriptedPublisher, Recorder, KVEventSubscriber]) -> None:
    pub, rec, sub = scripted
    seen: list[float] = []

    def on_batch(batch: KVEventBatch) -> None:
        seen.append(batch.ts)
        if batch.ts == 0.0:
            raise RuntimeError("index bug")

    sub._on_batch = on_batch
    await pub.send(b"", seq_bytes(0), payload(0))
    await pub.send(b"", seq_bytes(1), payload(1))
    await wait_for(lambda: seen == [0.0, 1.0], "both batches")
    assert sub.stats.callback_errors == 1


async def test_late_subscriber_catches_up_then_follows_live() -> None:
    events = [BlockStored((i,), i - 1 if i else None, (i, i), 2) for i in range(5)]
    rec = Recorder()
    async with KVEventPublisher(buffer_steps=100) as pub:
        for event in events[:3]:
            pub.publish([event])
        assert pub.port and pub.replay_port
        got: list[Any] = []
        sub = KVEventSubscriber(f"tcp://127.0.0.1:{pub.port}", f"tcp://127.0.0.1:{pub.replay_port}",
                                on_batch=lambda b: got.extend(b.events), on_reset=lambda: rec.on_reset())
        await sub.start()
        try:
            await wait_for(lambda: len(got) == 3, "the catch-up")
            for event in events[3:]:
                pub.publish([event])
            await wait_for(lambda: len(got) == 5, "live batches")
        finally:
            await sub.close()
    assert got == events
    assert sub.last_seq == 4 and rec.log == []


async def test_publisher_restart_resets_and_follows_the_new_stream() -> None:
    port, replay_port = free_ports(2)
    endpoints = (f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay_port}")
    rec = Recorder()
    sub = rec.subscriber(port, replay_port)
    await sub.start()
    try:
        async with KVEventPublisher(*endpoints) as first:
            first.publish([AllBlocksCleared()])
            await wait_for(lambda: rec.log, "the first publisher's batch")
        await wait_for(lambda: sub.stats.disconnects, "the disconnect")
        async with KVEventPublisher(*endpoints, clock=lambda: 42.0) as second:
            second.publish([AllBlocksCleared()])
            await wait_for(lambda: 42.0 in rec.log, "the second publisher's batch")
    finally:
        await sub.close()
    assert rec.log[1:] == ["reset", 42.0]
    assert sub.stats.resets == 1


async def test_publish_from_another_thread_keeps_order() -> None:
    got: list[float] = []
    async with KVEventPublisher() as pub:
        assert pub.port and pub.replay_port
        sub = KVEventSubscriber(f"tcp://127.0.0.1:{pub.port}", f"tcp://127.0.0.1:{pub.replay_port}",
                                on_batch=lambda b: got.append(b.ts), on_reset=lambda: None)
        await sub.start()
        try:
            ticks = iter(range(100))
            pub._clock = lambda: float(next(ticks))

            def burst() -> None:
                for _ in range(50):
                    pub.publish([AllBlocksCleared()])

            await asyncio.to_thread(burst)
            await wait_for(lambda: len(got) == 50, "50 batches")
        finally:
            await sub.close()
    assert got == [float(i) for i in range(50)]
