"""The executor side of cache management: track prefixes, run `decide()`, submit actions.

`PrefixTracker` remembers, per prefix (chunk key), recent hit times and which
instances served it — bounded (LRU, `max_tracked_prefixes`) and forgetful
(`retention`). `CacheManager.maybe_run()` runs `decide()` at most once per
`interval` and submits each action to the gateway's bounded background queue
(a full queue drops it: counted as outcome "dropped"). An action in flight counts
as done for the next rounds; it is recorded on success and forgotten on failure,
so a failed pin is tried again in a later round, never twice at once — after 1, 2,
4, ... intervals as its failures repeat (at most `MAX_BACKOFF_ROUNDS` intervals).
"""

from __future__ import annotations

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

    def snapshot(self, now: float | None = None) -> list[PrefixStat]:
        """Immutable stats for `decide()`; pending actions, and failed ones still
        backing off at `now`, count as done."""
        held = set(self.pending)
        if now is not None:
            held.update(m for m, (_, not_before) in self.backoff.items() if not_before > now)
        pins = {(k, i) for kind, k, i in held if kind == "pin"}
        packs = {(k, i) for kind, k, i in held if kind == "compress"}
        gone = {(k, i) for kind, k, i in held if kind == "evict"}
        return [
            PrefixStat(key, e.parent, e.root, e.end, tuple(e.hits), e.last_seen,
                       frozenset(i for i in e.holders if (key, i) not in gone),
                       frozenset(e.pinned | {i for k, i in pins if k == key}),
                       frozenset(e.compressed | {i for k, i in packs if k == key}))
            for key, e in self._entries.items()
        ]

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
        for entry in self._entries.values():
            entry.holders.discard(instance_id)
            if location == self.config.pin_location:
                entry.pinned.discard(instance_id)
            if location == self.config.compress_location:
                entry.compressed.discard(instance_id)

    def applied(self, action: Action) -> None:
        """Record a successful action on the whole chain it touched."""
        for key in self.chain(action.key):
            entry = self._entries[key]
            if action.kind == "pin":
                entry.pinned.add(action.instance_id)
            elif action.kind == "compress":
                entry.compressed.add(action.instance_id)
            else:
                entry.holders.discard(action.instance_id)


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
        self._clears: dict[tuple[str, str], int] = {}  # (instance, location) -> times cleared whole

    def record(self, keys: Sequence[int], tokens: Sequence[int], instance_id: str) -> None:
        if keys:
            self.tracker.record(keys, tokens, instance_id, self._clock())

    def maybe_run(self, instances: Sequence[InstanceLoad], gateway_load: float) -> list[Action]:
        """Decide (at most once per `interval`) and submit; returns the actions submitted."""
        now = self._clock()
        if self._last_run is not None and now - self._last_run < self.config.interval:
            return []
        self._last_run = now
        actions = decide(Observations(self.tracker.snapshot(now), instances, gateway_load), now, self.config)
        submitted = []
        for action in actions:
            tokens = self.tracker.prefix_tokens(action.key)
            if tokens is None:
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
