"""Cache rounds off the event loop: cached snapshots equal fresh ones, a round submits
exactly what `decide()` makes of its snapshot, one round at a time, once per interval."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from typing import Any

import pytest

import filters.cache_manager as cache_manager
from filters.cache_manager import CacheManager, PrefixTracker
from filters.cache_strategy import (
    Action,
    CacheStrategyConfig,
    InstanceLoad,
    Observations,
    PrefixStat,
    decide,
)
from filters.local_index import prompt_chunk_keys
from gateway.background import BackgroundQueue
from tests.conftest import wait_until
from tests.filters.test_cache_strategy_executor import Clock, RecordingControl, serve

CFG = CacheStrategyConfig(enable_pinning=True, enable_eviction=True, enable_compression=True,
                          hot_window=60.0, hot_threshold=3, cold_after=30.0, interval=1.0,
                          retention=600.0, max_tracked_prefixes=200)
LOADS = [InstanceLoad("inst-a", 0.1, 0.95), InstanceLoad("inst-b", 0.9, 0.1)]  # a evicts, b compresses


def fresh_snapshot(tracker: PrefixTracker, now: float) -> tuple[PrefixStat, ...]:
    """The tracker's state rebuilt from scratch (what snapshot() computed before caching)."""
    held = set(tracker.pending) | {m for m, (_, nb) in tracker.backoff.items() if nb > now}
    return tuple(
        PrefixStat(key, e.parent, e.root, e.end, tuple(e.hits), e.last_seen,
                   frozenset(e.holders - {i for kind, k, i in held if kind == "evict" and k == key}),
                   frozenset(e.pinned | {i for kind, k, i in held if kind == "pin" and k == key}),
                   frozenset(e.compressed | {i for kind, k, i in held if kind == "compress" and k == key}))
        for key, e in tracker._entries.items())


def test_cached_snapshot_equals_a_fresh_one_after_every_kind_of_change() -> None:
    rng = random.Random(7)
    tracker = PrefixTracker(CFG)
    now = 100.0
    kinds = ("pin", "compress", "evict")
    for step in range(600):
        now += rng.choice((0.1, 1.0, 20.0))
        op = rng.randrange(6)
        keys = list(tracker._entries)
        if op <= 1 or not keys:
            toks = [rng.randrange(30)] * 256 + [rng.randrange(5)] * 256 + [step] * 256
            tracker.record(prompt_chunk_keys(toks), toks, rng.choice(("a", "b", "c")), now)
        elif op == 2:
            tracker.applied(Action(rng.choice(kinds), rng.choice(("a", "b")), "LocalCPUBackend",
                                   rng.choice(keys), 256, "test"))
        elif op == 3:
            marker = (rng.choice(kinds), rng.choice(keys), rng.choice(("a", "b")))
            tracker.pending.symmetric_difference_update({marker})
        elif op == 4:
            tracker.failed((rng.choice(kinds), rng.choice(keys), rng.choice(("a", "b"))), now)
        elif rng.random() < 0.2:
            tracker.cleared(rng.choice(("a", "b")), "LocalCPUBackend")
        assert tracker.snapshot(now) == fresh_snapshot(tracker, now), f"step {step}"


def fill(manager: CacheManager, clock: Clock) -> None:
    """Cold chains on both instances, then one prefix hot on inst-a."""
    for i in range(20):
        toks = [5000 + i] * 768
        manager.record(prompt_chunk_keys(toks), toks, ("inst-a", "inst-b")[i % 2])
    clock.now += CFG.cold_after + 1
    serve(manager, clock, 3)


async def test_a_round_submits_exactly_what_decide_makes_of_the_snapshot() -> None:
    clock = Clock()
    queue = BackgroundQueue(256)  # not started: actions stay queued
    manager = CacheManager(CFG, RecordingControl(), queue, clock=clock)
    fill(manager, clock)
    expected = decide(Observations(fresh_snapshot(manager.tracker, clock.now), LOADS, 0.0), clock.now, CFG)
    assert {a.kind for a in expected} == {"pin", "evict", "compress"}
    assert await manager.run_round(LOADS, 0.0) == expected
    assert queue.pending() == len(expected)


class BlockingDecide:
    """Stands in for decide() (which it then calls): waits in its thread until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self.timed_out = False
        self.thread: str | None = None

    def __call__(self, obs: Observations, now: float, config: CacheStrategyConfig) -> list[Action]:
        self.calls += 1
        self.thread = threading.current_thread().name
        self.entered.set()
        if not self.release.wait(10):  # on the loop this would wait for ever: nothing releases it
            self.timed_out = True
        self.entered.clear()
        return decide(obs, now, config)


@pytest.fixture
def blocking(monkeypatch: pytest.MonkeyPatch) -> BlockingDecide:
    fake = BlockingDecide()
    monkeypatch.setattr(cache_manager, "decide", fake)
    return fake


async def started(clock: Clock) -> tuple[CacheManager, BackgroundQueue]:
    queue = BackgroundQueue(256)
    queue.start()
    return CacheManager(CFG, RecordingControl(), queue, clock=clock), queue


async def test_decide_runs_in_a_worker_thread_and_one_round_at_a_time(blocking: BlockingDecide) -> None:
    clock = Clock()
    manager, queue = await started(clock)
    fill(manager, clock)
    first = manager.maybe_run(LOADS, 0.0)
    await wait_until(blocking.entered.is_set, message="decide entered")  # the loop runs meanwhile
    assert blocking.thread != threading.main_thread().name and manager.busy
    clock.now += 10 * CFG.interval  # due again, but a round is under way
    second = manager.maybe_run(LOADS, 0.0)
    assert second.done() and second.result() == [] and queue.stats.submitted == 1
    blocking.release.set()
    assert {a.kind for a in await first} == {"pin", "evict", "compress"}
    assert blocking.calls == 1 and not blocking.timed_out
    clock.now += CFG.interval
    await manager.maybe_run(LOADS, 0.0)  # the round is over: the next one runs
    assert blocking.calls == 2
    await queue.close()


async def test_requests_recorded_while_decide_runs_wait_for_the_next_round(blocking: BlockingDecide) -> None:
    clock = Clock()
    manager, queue = await started(clock)
    serve(manager, clock, 2)  # not hot yet
    first = manager.maybe_run([], 0.0)
    await wait_until(blocking.entered.is_set, message="decide entered")
    serve(manager, clock, 1)  # hot now, after the snapshot was taken
    blocking.release.set()
    assert await first == []
    clock.now += CFG.interval
    assert [a.kind for a in await manager.maybe_run([], 0.0)] == ["pin"]
    await queue.close()


async def test_a_failing_round_yields_no_actions_and_frees_the_next_one(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    manager, queue = await started(clock)
    serve(manager, clock, 3)

    def broken(*_: Any) -> Sequence[Action]:
        raise RuntimeError("boom")

    monkeypatch.setattr(cache_manager, "decide", broken)
    assert await manager.maybe_run([], 0.0) == [] and not manager.busy
    monkeypatch.setattr(cache_manager, "decide", decide)
    clock.now += CFG.interval
    assert [a.kind for a in await manager.maybe_run([], 0.0)] == ["pin"]
    await queue.close()


async def test_a_round_dropped_by_a_full_queue_frees_the_next_one() -> None:
    clock = Clock()
    queue = BackgroundQueue(1)  # not started

    async def nothing() -> None:
        return None

    assert queue.submit("filler", nothing)
    manager = CacheManager(CFG, RecordingControl(), queue, clock=clock)
    assert await manager.maybe_run([], 0.0) == [] and not manager.busy
    assert queue.stats.dropped == 1
