"""CacheManager: tracker + decide() + execution on the real bounded background queue."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Sequence

from filters.cache_manager import CacheManager, PrefixTracker
from filters.cache_strategy import Action, CacheStrategyConfig, InstanceLoad
from filters.lmcache_client import LMCacheUnavailable
from filters.local_index import prompt_chunk_keys
from gateway.background import BackgroundQueue
from tests.conftest import wait_until

CFG = CacheStrategyConfig(enable_pinning=True, enable_eviction=True, hot_window=60.0, hot_threshold=3,
                          cold_after=30.0, interval=1.0, retention=600.0, max_tracked_prefixes=50)
SHARED = list(range(1000, 1512))  # two full chunks


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


class RecordingControl:
    """Stands in for LMCacheClient's management calls; can be told to fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self.fail = False
        self.evict_outcome = "evicted"

    async def pin(self, instance_id: str, location: str, tokens: Sequence[int]) -> int:
        if self.fail:
            raise LMCacheUnavailable("controller down")
        self.calls.append(("pin", instance_id, len(tokens)))
        return len(tokens)

    async def compress(self, instance_id: str, method: str, location: str,
                       tokens: Sequence[int] | None = None) -> int:
        self.calls.append(("compress", instance_id, len(tokens or ())))
        return len(tokens or ())

    async def evict(self, instance_id: str, tokens: Sequence[int], location: str = "LocalCPUBackend") -> str:
        self.calls.append(("evict", instance_id, len(tokens)))
        return self.evict_outcome


def request(i: int) -> list[int]:
    return SHARED + [i] * 300  # shared two chunks + one unique chunk


async def make(clock: Clock, queue_size: int = 16) -> tuple[CacheManager, RecordingControl, BackgroundQueue,
                                                            list[tuple[str, str]]]:
    queue = BackgroundQueue(queue_size)
    queue.start()
    control = RecordingControl()
    outcomes: list[tuple[str, str]] = []
    manager = CacheManager(CFG, control, queue, clock=clock,
                           on_outcome=lambda a, o: outcomes.append((a.kind, o)))
    return manager, control, queue, outcomes


def serve(manager: CacheManager, clock: Clock, n: int, instance: str = "inst-a") -> None:
    for i in range(n):
        toks = request(i)
        manager.record(prompt_chunk_keys(toks), toks, instance)
        clock.now += 0.1


async def test_hot_prefix_pinned_once_with_its_exact_tokens() -> None:
    clock = Clock()
    manager, control, queue, outcomes = await make(clock)
    serve(manager, clock, 3)
    submitted = await manager.maybe_run([InstanceLoad("inst-a", 0.0, 0.1)], 0.0)
    assert [(a.kind, a.instance_id, a.end) for a in submitted] == [("pin", "inst-a", 512)]
    await wait_until(lambda: outcomes == [("pin", "ok")], message="pin done")
    assert control.calls == [("pin", "inst-a", 512)]
    serve(manager, clock, 5)
    clock.now += 5
    assert await manager.maybe_run([InstanceLoad("inst-a", 0.0, 0.1)], 0.0) == []
    assert control.calls == [("pin", "inst-a", 512)]
    await queue.close()


async def test_rounds_are_rate_limited_by_interval() -> None:
    clock = Clock()
    manager, control, queue, _ = await make(clock)
    serve(manager, clock, 1)
    assert await manager.maybe_run([], 0.0) == []   # first round: nothing hot yet
    assert queue.stats.submitted == 1               # the round itself ran as a background job
    serve(manager, clock, 2)                        # now hot, but only 0.2 s later
    assert await manager.maybe_run([], 0.0) == []
    assert queue.stats.submitted == 1               # no round scheduled
    clock.now += 1.0
    assert [a.kind for a in await manager.maybe_run([], 0.0)] == ["pin"]
    assert queue.stats.submitted == 3               # a round and its pin
    await queue.close()


async def test_failed_pin_is_retried_in_a_later_round_never_concurrently() -> None:
    clock = Clock()
    manager, control, queue, outcomes = await make(clock)
    control.fail = True
    serve(manager, clock, 3)
    assert len(await manager.maybe_run([], 0.0)) == 1
    await wait_until(lambda: outcomes == [("pin", "failed")], message="pin failure")
    control.fail = False
    clock.now += 1.0
    assert len(await manager.maybe_run([], 0.0)) == 1
    await wait_until(lambda: outcomes[-1] == ("pin", "ok"), message="pin retried")
    assert control.calls == [("pin", "inst-a", 512)]
    await queue.close()


async def test_pending_action_is_not_submitted_twice() -> None:
    clock = Clock()
    queue = BackgroundQueue(16)  # not started: jobs stay queued
    control = RecordingControl()
    manager = CacheManager(CFG, control, queue, clock=clock)
    serve(manager, clock, 3)
    assert len(await manager.run_round([], 0.0)) == 1
    clock.now += 1.0
    assert await manager.run_round([], 0.0) == []
    assert queue.pending() == 1


async def test_full_queue_drops_and_counts() -> None:
    clock = Clock()
    queue = BackgroundQueue(1)  # not started, room for one job
    outcomes: list[tuple[str, str]] = []
    manager = CacheManager(CFG, RecordingControl(), queue, clock=clock,
                           on_outcome=lambda a, o: outcomes.append((a.kind, o)))
    for n in range(2):  # two distinct hot prefixes on two instances
        for i in range(3):
            toks = [n] * 256 + [i] * 256
            manager.record(prompt_chunk_keys(toks), toks, f"inst-{n}")
    submitted = await manager.run_round([], 0.0)
    assert len(submitted) == 1 and outcomes == [("pin", "dropped")]
    assert queue.stats.dropped == 1


async def test_eviction_of_cold_prefix_reports_chain_and_outcome() -> None:
    clock = Clock()
    queue = BackgroundQueue(16)
    queue.start()
    control = RecordingControl()
    control.evict_outcome = "cleared"
    evicted: list[tuple[str, list[int]]] = []
    outcomes: list[tuple[str, str]] = []
    manager = CacheManager(CFG, control, queue, clock=clock, on_evicted=lambda i, k: evicted.append((i, k)),
                           on_outcome=lambda a, o: outcomes.append((a.kind, o)))
    toks = request(7)
    keys = prompt_chunk_keys(toks)
    manager.record(keys, toks, "inst-a")
    clock.now += 31  # cold
    await manager.maybe_run([InstanceLoad("inst-a", 0.0, 0.95)], 0.0)
    await wait_until(lambda: outcomes == [("evict", "cleared")], message="evict done")
    assert control.calls == [("evict", "inst-a", 768)]
    assert evicted == [("inst-a", list(reversed(keys)))]
    clock.now += 1
    assert await manager.maybe_run([InstanceLoad("inst-a", 0.0, 0.95)], 0.0) == []  # no longer held there
    await queue.close()


def test_tracker_is_bounded_and_forgets_old_prefixes() -> None:
    tracker = PrefixTracker(CFG)
    for i in range(40):
        toks = [i] * 512
        tracker.record(prompt_chunk_keys(toks), toks, "a", now=float(i))
    assert len(tracker) == CFG.max_tracked_prefixes
    tracker.record(prompt_chunk_keys([999] * 256), [999] * 256, "a", now=10_000.0)
    assert len(tracker) == 1  # everything else is older than `retention`


def test_pin_marks_the_whole_chain() -> None:
    tracker = PrefixTracker(CFG)
    toks = request(1)
    keys = prompt_chunk_keys(toks)
    tracker.record(keys, toks, "a", now=1.0)
    tracker.applied(Action("pin", "a", "LocalCPUBackend", keys[1], 512, "hot"))
    pinned = {s.key: s.pinned for s in tracker.snapshot()}
    assert pinned == {keys[0]: {"a"}, keys[1]: {"a"}, keys[2]: frozenset()}


async def test_background_jobs_never_block_each_other() -> None:
    """A slow action does not stop the filter path: a round only queues its actions."""
    clock = Clock()
    gate = asyncio.Event()

    class Slow(RecordingControl):
        async def pin(self, instance_id: str, location: str, tokens: Sequence[int]) -> int:
            await gate.wait()
            return await super().pin(instance_id, location, tokens)

    queue = BackgroundQueue(16)
    queue.start()
    control = Slow()
    manager = CacheManager(CFG, control, queue, clock=clock)
    serve(manager, clock, 3)
    assert len(await manager.maybe_run([], 0.0)) == 1  # the round ends although pin blocks
    assert control.calls == []
    gate.set()
    await wait_until(lambda: control.calls == [("pin", "inst-a", 512)], message="slow pin")
    await queue.close()


async def test_a_permanently_failing_pin_backs_off_instead_of_running_every_round() -> None:
    clock = Clock()
    manager, control, queue, outcomes = await make(clock)
    control.fail = True
    serve(manager, clock, 3)
    for _ in range(40):  # 40 rounds, one interval apart
        await manager.maybe_run([], 0.0)
        await wait_until(lambda: queue.pending() == 0 and not manager.busy, message="round done")
        clock.now += CFG.interval
    failures = outcomes.count(("pin", "failed"))
    assert 3 <= failures <= 7, outcomes  # rounds 0, 1, 3, 7, 15, 31: not 40
    control.fail = False
    clock.now += 300 * CFG.interval
    serve(manager, clock, 3)  # hot again
    await manager.maybe_run([], 0.0)
    await wait_until(lambda: outcomes[-1] == ("pin", "ok"), message="pin succeeds once the controller is back")
    assert not manager.tracker.backoff
    await queue.close()


def test_hit_tracker_keeps_prompt_tokens_compactly() -> None:
    """10 000 tracked prefixes each pinned a Python list of the request's ids (~36 B a
    token): ~90 MB at the defaults. Kept as 4-byte ids it is about a ninth."""
    tracker = PrefixTracker(CacheStrategyConfig(enable_pinning=True, max_tracked_prefixes=10_000))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for r in range(20):
            tokens = [100_000 + r * 10_000 + t for t in range(4096)]  # ids > 256 are separate int objects
            tracker.record(prompt_chunk_keys(tokens), tokens, "inst-a", float(r))
            del tokens
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(tracker) == 20 * 16
    assert grown < 20 * 4096 * 12, grown  # a list of fresh ints costs ~36 B a token
    assert tracker.prefix_tokens(next(iter(tracker._entries)))[:3] == [100_000, 100_001, 100_002]


async def test_an_evict_that_cleared_the_whole_location_is_not_repeated_for_every_prefix() -> None:
    """Real LMCache has no /evict: the `clear` fallback drops everything the instance
    holds at that location. Twelve cold prefixes must not mean twelve clears."""
    clock = Clock()
    manager, control, queue, outcomes = await make(clock)
    control.evict_outcome = "cleared"
    for i in range(12):
        tokens = [50_000 + i * 1000 + t for t in range(300)]
        manager.record(prompt_chunk_keys(tokens), tokens, "inst-a")
    clock.now += CFG.cold_after + 1
    for _ in range(3):
        await manager.maybe_run([InstanceLoad("inst-a", 0.0, 0.99)], 0.0)
        await wait_until(lambda: queue.pending() == 0 and not manager.busy, message="round done")
        clock.now += CFG.interval
    assert [c[0] for c in control.calls] == ["evict"]
    assert outcomes.count(("evict", "cleared")) == 1 and ("evict", "already_cleared") in outcomes
    await queue.close()
