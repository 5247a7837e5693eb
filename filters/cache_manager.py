"""The executor side of cache management: track prefixes, run `decide()`, submit actions.

`PrefixTracker` remembers, per prefix (chunk key), recent hit times and which
instances served it — bounded (LRU, `max_tracked_prefixes`) and forgetful
(`retention`). `CacheManager.maybe_run()` schedules a round at most once per
`interval`, one at a time, as a job on the gateway's bounded background queue;
the round snapshots the tracker on the loop (immutable, cached per prefix until
it changes), runs `decide()` on that snapshot in a worker thread and submits each
action to the same queue (a full queue drops it: counted as outcome "dropped").
Everything else here runs on the event loop only. An action in flight counts
as done for the next rounds; it is recorded on success and forgotten on failure,
so a failed pin is tried again in a later round, never twice at once — after 1, 2,
4, ... intervals as its failures repeat (at most `MAX_BACKOFF_ROUNDS` intervals).
"""

from __future__ import annotations

import asyncio
import logging
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from filters.base import BackgroundSubmitter
from filters.cache_strategy import (
    Action,
    CacheStrategyConfig,
    InstanceLoad,
    Observations,
    PrefixStat,
    decide,
)

log = logging.getLogger("kvgate.cache_strategy")

Outcome = Callable[[Action, str], None]  # (action, outcome) -> None, for metrics
MAX_BACKOFF_ROUNDS = 256  # a failing action is retried at least once per this many intervals
MIN_BACKOFF = 1.0  # seconds: the backoff unit when `interval` is shorter (e.g. 0s: a round per completion)
_NONE: frozenset[str] = frozenset()  # shared by the stats of prefixes pinned/compressed nowhere


class CacheControl(Protocol):
    """The LMCache client calls the executor needs."""

    async def pin(self, instance_id: str, location: str, tokens: Sequence[int]) -> int: ...
    async def compress(self, instance_id: str, method: str, location: str,
                       tokens: Sequence[int] | None = None) -> int: ...
    async def evict(self, instance_id: str, tokens: Sequence[int], location: str = "LocalCPUBackend") -> str: ...


@dataclass(slots=True)
class _Entry:
    parent: int | None
    root: int
    end: int
    tokens: Sequence[int]
    hits: deque[float]
    last_seen: float = 0.0
    holders: set[str] = field(default_factory=set)
    pinned: set[str] = field(default_factory=set)
    compressed: set[str] = field(default_factory=set)
    stat: PrefixStat | None = None  # cached immutable view; None once any field above changed


class PrefixTracker:
    def __init__(self, config: CacheStrategyConfig, chunk_size: int = 256) -> None:
        self.config = config
        self.chunk_size = chunk_size
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self.pending: set[tuple[str, int, str]] = set()  # (kind, key, instance) submitted, not finished
        # (kind, key, instance) -> (consecutive failures, not before): a failing action backs off
        self.backoff: dict[tuple[str, int, str], tuple[int, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, keys: Sequence[int], tokens: Sequence[int], instance_id: str, now: float) -> None:
        """One completed request: `instance_id` served `tokens`, whose chunk keys are `keys`.
        The tokens are kept once per request, compactly (4 bytes a token, not ~36)."""
        tokens = _compact(tokens)
        parent: int | None = None
        for i, key in enumerate(keys):
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(parent, keys[0], (i + 1) * self.chunk_size, tokens,
                                                    deque(maxlen=self.config.hot_threshold))
            else:
                self._entries.move_to_end(key)
                entry.tokens = tokens
            entry.hits.append(now)
            entry.stat = None
            entry.last_seen = now
            entry.holders.add(instance_id)
            entry.compressed.discard(instance_id)
            parent = key
        self._trim(now)

    def _trim(self, now: float) -> None:
        while len(self._entries) > self.config.max_tracked_prefixes:
            self._entries.popitem(last=False)
        while self._entries:
            key, oldest = next(iter(self._entries.items()))
            if now - oldest.last_seen < self.config.retention:
                break
            del self._entries[key]

    def failed(self, marker: tuple[str, int, str], now: float) -> None:
        """The action failed: it is not tried again for `unit * 2**(failures-1)`, unit =
        max(`interval`, `MIN_BACKOFF`), at most `MAX_BACKOFF_ROUNDS` units, so a
        permanently failing action does not hit the controller every round forever."""
        failures = self.backoff.pop(marker, (0, 0.0))[0] + 1
        rounds = min(2 ** (failures - 1), MAX_BACKOFF_ROUNDS)
        self.backoff[marker] = (failures, now + rounds * max(self.config.interval, MIN_BACKOFF))
        while len(self.backoff) > self.config.max_tracked_prefixes:
            del self.backoff[next(iter(self.backoff))]

    def snapshot(self, now: float | None = None) -> tuple[PrefixStat, ...]:
        """Immutable stats for `decide()`; pending actions, and failed ones still
        backing off at `now`, count as done. Each entry's stat is cached until the
        entry changes, so a round costs one pass over the entries, not a rebuild."""
        held = set(self.pending)
        if now is not None:
            held.update(m for m, (_, not_before) in self.backoff.items() if not_before > now)
        extra: dict[int, tuple[set[str], set[str], set[str]]] = {}  # key -> (pinned, compressed, gone)
        for kind, key, instance in held:
            if key in self._entries:
                slot = extra.setdefault(key, (set(), set(), set()))
                slot[("pin", "compress", "evict").index(kind)].add(instance)
        out = [e.stat if e.stat is not None else _stat(key, e) for key, e in self._entries.items()]
        if extra:
            for i, key in enumerate(self._entries):
                if key in extra:
                    out[i] = _stat(key, self._entries[key], *extra[key])
        return tuple(out)

    def prefix_tokens(self, key: int) -> list[int] | None:
        entry = self._entries.get(key)
        return list(entry.tokens[: entry.end]) if entry is not None else None

    def chain(self, key: int) -> list[int]:
        """`key` and its known ancestors, longest first."""
        out = []
        node: int | None = key
        while node is not None and node in self._entries:
            out.append(node)
            node = self._entries[node].parent
        return out

    def cleared(self, instance_id: str, location: str) -> None:
        """`location` of `instance_id` was cleared as a whole: it holds none of the
        tracked prefixes any more (so none is evicted there again)."""
        pin = location == self.config.pin_location
        pack = location == self.config.compress_location
        for entry in self._entries.values():
            if (instance_id in entry.holders or (pin and instance_id in entry.pinned)
                    or (pack and instance_id in entry.compressed)):
                entry.stat = None
                entry.holders.discard(instance_id)
                if pin:
                    entry.pinned.discard(instance_id)
                if pack:
                    entry.compressed.discard(instance_id)

    def applied(self, action: Action) -> None:
        """Record a successful action on the whole chain it touched."""
        for key in self.chain(action.key):
            entry = self._entries[key]
            entry.stat = None
            if action.kind == "pin":
                entry.pinned.add(action.instance_id)
            elif action.kind == "compress":
                entry.compressed.add(action.instance_id)
            else:
                entry.holders.discard(action.instance_id)


def _stat(key: int, e: _Entry, pins: set[str] | None = None, packs: set[str] | None = None,
          gone: set[str] | None = None) -> PrefixStat:
    """`e` as an immutable stat; without extras it is cached on the entry."""
    if pins is None and packs is None and gone is None:
        e.stat = PrefixStat(key, e.parent, e.root, e.end, tuple(e.hits), e.last_seen, frozenset(e.holders),
                            frozenset(e.pinned) if e.pinned else _NONE,
                            frozenset(e.compressed) if e.compressed else _NONE)
        return e.stat
    return PrefixStat(key, e.parent, e.root, e.end, tuple(e.hits), e.last_seen,
                      frozenset(e.holders - (gone or set())), frozenset(e.pinned | (pins or set())),
                      frozenset(e.compressed | (packs or set())))


def _compact(tokens: Sequence[int]) -> Sequence[int]:
    try:
        return array("I", tokens)
    except (OverflowError, TypeError):  # an id outside uint32: keep them as given
        return tokens


class CacheManager:
    """Runs `decide()` on the tracker's observations and executes the actions in the background."""

    def __init__(self, config: CacheStrategyConfig, client: CacheControl, background: BackgroundSubmitter, *,
                 chunk_size: int = 256, clock: Callable[[], float] = time.monotonic,
                 on_outcome: Outcome | None = None,
                 on_evicted: Callable[[str, list[int]], None] | None = None) -> None:
        self.config = config
        self.client = client
        self.background = background
        self.tracker = PrefixTracker(config, chunk_size)
        self._clock = clock
        self._on_outcome = on_outcome
        self._on_evicted = on_evicted
        self._last_run: float | None = None
        self._round: asyncio.Future[list[Action]] | None = None  # the round scheduled or running
        self._clears: dict[tuple[str, str], int] = {}  # (instance, location) -> times cleared whole

    def record(self, keys: Sequence[int], tokens: Sequence[int], instance_id: str) -> None:
        if keys:
            self.tracker.record(keys, tokens, instance_id, self._clock())

    @property
    def busy(self) -> bool:
        """A round is scheduled or running, or one of its actions is not finished."""
        return self._round is not None or bool(self.tracker.pending)

    def due(self) -> bool:
        """Would `maybe_run` schedule a round now (interval elapsed, none under way)?
        Callers check it first, so the observations are gathered only when they are used."""
        if self._round is not None:
            return False
        return self._last_run is None or self._clock() - self._last_run >= self.config.interval

    def maybe_run(self, instances: Sequence[InstanceLoad], gateway_load: float) -> asyncio.Future[list[Action]]:
        """Schedule a round as a job on the background queue — at most once per `interval`
        and never while one is scheduled or running — and return at once (call on the loop).
        The future gets the actions the round submitted; [] at once when no round was
        scheduled (too early, one already under way, or the queue full). Nothing is
        awaited here: the caller may ignore the future."""
        future: asyncio.Future[list[Action]] = asyncio.get_running_loop().create_future()
        if not self.due():
            future.set_result([])
            return future
        self._last_run = self._clock()
        self._round = future
        if not self.background.submit("cache-round", self._round_job(tuple(instances), gateway_load, future)):
            self._round = None
            future.set_result([])
        return future

    def _round_job(self, instances: tuple[InstanceLoad, ...], gateway_load: float,
                   future: asyncio.Future[list[Action]]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            submitted: list[Action] = []
            try:
                submitted = await self.run_round(instances, gateway_load)
            except Exception as exc:  # noqa: BLE001 - a background job reports, never raises
                log.warning("cache round failed: %s", exc, exc_info=True)
            finally:
                self._round = None
                if not future.done():
                    future.set_result(submitted)

        return run

    async def run_round(self, instances: Sequence[InstanceLoad], gateway_load: float) -> list[Action]:
        """One round now, whatever the interval: the tracker's snapshot is taken on the loop,
        `decide()` runs on it in a worker thread (it reads only that immutable snapshot, so
        the loop goes on mutating the tracker), and the actions are submitted back on the
        loop; returns the actions submitted. `maybe_run()` is the rate-limited way in."""
        now = self._clock()
        obs = Observations(self.tracker.snapshot(now), tuple(instances), gateway_load)
        actions = await asyncio.to_thread(decide, obs, now, self.config)
        return self._submit(actions)

    def _submit(self, actions: list[Action]) -> list[Action]:
        submitted = []
        for action in actions:
            tokens = self.tracker.prefix_tokens(action.key)
            if tokens is None:  # forgotten while decide() ran
                continue
            marker = (action.kind, action.key, action.instance_id)
            self.tracker.pending.add(marker)
            if self.background.submit(f"lmcache-{action.kind}", self._job(action, tokens, marker)):
                submitted.append(action)
            else:
                self.tracker.pending.discard(marker)
                self._outcome(action, "dropped")
        return submitted

    def _job(self, action: Action, tokens: list[int],
             marker: tuple[str, int, str]) -> Callable[[], Awaitable[None]]:
        where = (action.instance_id, action.location)
        clears = self._clears.get(where, 0)

        async def run() -> None:
            try:
                if action.kind == "evict" and self._clears.get(where, 0) != clears:
                    outcome = "already_cleared"  # an earlier evict fell back to clearing it all
                else:
                    outcome = await self.execute(action, tokens)
            except Exception as exc:  # noqa: BLE001 - a background job reports, never raises
                log.warning("cache %s on %s failed: %s", action.kind, action.instance_id, exc)
                self.tracker.failed(marker, self._clock())
                self._outcome(action, "failed")
            else:
                self.tracker.backoff.pop(marker, None)
                if outcome == "cleared":
                    self._clears[where] = self._clears.get(where, 0) + 1
                    self.tracker.cleared(*where)
                self.tracker.applied(action)
                if action.kind == "evict" and self._on_evicted is not None:
                    self._on_evicted(action.instance_id, self.tracker.chain(action.key) or [action.key])
                self._outcome(action, outcome)
            finally:
                self.tracker.pending.discard(marker)

        return run

    async def execute(self, action: Action, tokens: list[int]) -> str:
        """Perform one action; returns its outcome ("ok", or evict's "evicted"/"cleared"/"skipped")."""
        if action.kind == "pin":
            await self.client.pin(action.instance_id, action.location, tokens)
            return "ok"
        if action.kind == "compress":
            await self.client.compress(action.instance_id, action.method or "zstd", action.location, tokens)
            return "ok"
        return await self.client.evict(action.instance_id, tokens, action.location)

    def _outcome(self, action: Action, outcome: str) -> None:
        if self._on_outcome is not None:
            self._on_outcome(action, outcome)
