"""Event-loop stall of one cache-management round (`CacheManager.maybe_run()`).

Fills a tracker with `--prefixes` prefixes (chains of 4 chunks) served by 4
instances, most of them cold, some hot, and reports instance loads that trigger
eviction (KV usage) and compression (load) on every instance. A ticker coroutine
wakes every millisecond and records the longest gap between two wake-ups while
`--rounds` rounds run, one interval apart, with a few new requests recorded
between rounds (as a live gateway would). Prints the stall of the first round
(all 10,000 prefixes new since the last round: the worst case for the snapshot),
the longest and median stall of the later rounds, and the wall time per round.
Works against either `maybe_run()` contract (a list, or a future of one).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Sequence

from filters.cache_manager import CacheManager
from filters.cache_strategy import CacheStrategyConfig, InstanceLoad
from filters.local_index import prompt_chunk_keys
from gateway.background import BackgroundQueue

INSTANCES = ("inst-0", "inst-1", "inst-2", "inst-3")
CHAIN = 4  # chunks per request


class _Clock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


class _FastControl:
    """Answers every management call at once (the round, not the controller, is measured)."""

    async def pin(self, instance_id: str, location: str, tokens: Sequence[int]) -> int:
        return len(tokens)

    async def compress(self, instance_id: str, method: str, location: str,
                       tokens: Sequence[int] | None = None) -> int:
        return len(tokens or ())

    async def evict(self, instance_id: str, tokens: Sequence[int], location: str = "LocalCPUBackend") -> str:
        return "evicted"


class _GcWatch:
    """The longest full (generation 2) collection while installed: such a pause stops every
    thread, whichever one triggered it, so it shows up as a loop stall too."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.count = 0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.count += 1
            self.longest = max(self.longest, time.perf_counter() - self._start)


class _Ticker:
    """Wakes every `period` seconds; `max_gap` is the longest time between two wake-ups."""

    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.max_gap = 0.0
        self._task: asyncio.Task[None] | None = None

    def reset(self) -> None:
        self.max_gap = 0.0

    async def _run(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(self.period)
            now = time.perf_counter()
            self.max_gap = max(self.max_gap, now - last - self.period)
            last = now

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _tokens(i: int) -> list[int]:
    return [i * 10_000 + t for t in range(CHAIN * 256)]


def _fill(manager: CacheManager, clock: _Clock, prefixes: int) -> None:
    requests = prefixes // CHAIN
    for i in range(requests):
        toks = _tokens(i)
        repeats = 12 if i % 100 == 0 else 1  # 1 % of the chains hot enough to pin
        for _ in range(repeats):
            manager.record(prompt_chunk_keys(toks), toks, INSTANCES[i % len(INSTANCES)])
        clock.now += 0.001
    clock.now += manager.config.cold_after + 1  # the rest is cold now


async def _round(manager: CacheManager, loads: list[InstanceLoad]) -> int:
    return len(await manager.maybe_run(loads, 0.9))


async def measure(prefixes: int, rounds: int) -> dict[str, float]:
    config = CacheStrategyConfig(enable_pinning=True, enable_compression=True, enable_eviction=True,
                                 max_tracked_prefixes=prefixes)
    clock = _Clock()
    queue = BackgroundQueue(4096)
    queue.start()
    manager = CacheManager(config, _FastControl(), queue, clock=clock)
    _fill(manager, clock, prefixes)
    loads = [InstanceLoad(i, 0.9, 0.95) for i in INSTANCES]
    ticker, gc_watch = _Ticker(), _GcWatch()
    gc.callbacks.append(gc_watch)
    ticker.start()
    await asyncio.sleep(0.01)
    stalls, walls, actions = [], [], 0
    for r in range(rounds):
        for j in range(8):  # a few live requests between rounds
            toks = _tokens(prefixes + r * 8 + j)
            manager.record(prompt_chunk_keys(toks), toks, INSTANCES[j % len(INSTANCES)])
        clock.now += config.interval
        ticker.reset()
        start = time.perf_counter()
        actions += await _round(manager, loads)
        walls.append(time.perf_counter() - start)
        await asyncio.sleep(0.005)  # let the ticker see the end of the round
        stalls.append(ticker.max_gap)
    await ticker.stop()
    gc.callbacks.remove(gc_watch)
    await queue.close()
    return {"first_stall_ms": stalls[0] * 1e3, "max_stall_ms": max(stalls[1:] or stalls) * 1e3,
            "median_stall_ms": statistics.median(stalls) * 1e3,
            "median_round_ms": statistics.median(walls) * 1e3, "actions": float(actions),
            "tracked": float(len(manager.tracker)), "full_gcs": float(gc_watch.count),
            "longest_full_gc_ms": gc_watch.longest * 1e3}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kvgate bench cache-round", description=__doc__)
    parser.add_argument("--prefixes", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    if args.prefixes < CHAIN or args.rounds < 1:
        parser.error("--prefixes must be >= 4 and --rounds >= 1")
    result = asyncio.run(measure(args.prefixes, args.rounds))
    lines = [
        f"Cache-management round, {int(result['tracked'])} tracked prefixes, 4 instances, {args.rounds} rounds "
        f"({int(result['actions'])} actions submitted); a 1 ms ticker records the longest event-loop gap.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| event-loop stall, first round after the fill (every prefix new) | {result['first_stall_ms']:.1f} ms |",
        f"| event-loop stall, later rounds, median per round | {result['median_stall_ms']:.1f} ms |",
        f"| event-loop stall, later rounds, longest | {result['max_stall_ms']:.1f} ms |",
        f"| round wall time (median) | {result['median_round_ms']:.1f} ms |",
        f"| full GCs during the rounds (longest) | {int(result['full_gcs'])} "
        f"({result['longest_full_gc_ms']:.1f} ms) |",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        from kvbench.report import write_section

        path = write_section("cache-round", "### Cache management off the event loop\n\n" + text)
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
