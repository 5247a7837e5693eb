"""Background cache management: a pure `decide()` and the tracker that feeds it.

A *prefix* is named by the LMCache chunk key of its last full chunk (keys chain,
so one key names the whole prefix); `parent` is the key one chunk shorter and
`root` the key of the first chunk. Every completed request counts a hit on each
of its prefixes, so a shared system prompt gets hits from every request and a
unique question only one.

Rules (each behind its `enable_*` switch):
- pin: a prefix with `hot_threshold` hits within `hot_window` is pinned on every
  instance that served it — only the longest hot prefix of a chain (pinning it
  pins its ancestors) and never twice on the same instance;
- compress: when the gateway's load or an instance's load exceeds
  `load_threshold`, cold prefixes held by the loaded instances are compressed;
- evict: when an instance's KV usage exceeds `memory_threshold`, its coldest
  prefixes are evicted.
LMCache applies pin/compress/evict to every chunk of the tokens it is given, i.e.
to the whole chain from the first token. So compress/evict only touch chains whose
root is cold (unused for `cold_after`): then every chunk of the chain is cold.
Pinned prefixes are never compressed or evicted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from kvkernel.decode import FieldError, Seconds

ActionKind = Literal["pin", "compress", "evict"]


@dataclass(frozen=True, slots=True)
class CacheStrategyConfig:
    """`cache_strategy:` of the kvcache filter (keys of issue #5 plus tuning knobs)."""

    enable_pinning: bool = False
    hot_window: Seconds = 300.0
    hot_threshold: int = 10
    pin_location: str = "LocalCPUBackend"
    enable_compression: bool = False
    load_threshold: float = 0.7
    compress_method: str = "zstd"
    compress_location: str = "LocalCPUBackend"
    enable_eviction: bool = False
    memory_threshold: float = 0.85
    evict_location: str = "LocalCPUBackend"
    cold_after: Seconds = 60.0          # a prefix unused this long is cold
    interval: Seconds = 1.0             # least time between two decide() rounds
    endpoint_capacity: int = 16         # requests in flight at one backend that mean load 1.0
    max_actions: int = 8                # per kind and round
    max_tracked_prefixes: int = 10_000
    retention: Seconds = 1800.0         # prefixes unused this long are forgotten

    def __post_init__(self) -> None:
        for name in ("hot_threshold", "endpoint_capacity", "max_actions", "max_tracked_prefixes"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.hot_window <= 0:
            raise FieldError("hot_window", "must be > 0")
        if not self.load_threshold > 0 or self.load_threshold == float("inf"):  # NaN would never compress
            raise FieldError("load_threshold", f"must be a number > 0, got {self.load_threshold}")
        for name in ("pin_location", "compress_method", "compress_location", "evict_location"):
            if not getattr(self, name):
                raise FieldError(name, "must not be empty")
        if not 0 < self.memory_threshold <= 1:
            raise FieldError("memory_threshold", f"must be in (0, 1], got {self.memory_threshold}")
        if self.retention < max(self.hot_window, self.cold_after):
            raise FieldError("retention", "must be >= hot_window and >= cold_after")

    @property
    def enabled(self) -> bool:
        return self.enable_pinning or self.enable_compression or self.enable_eviction


@dataclass(frozen=True, slots=True)
class PrefixStat:
    """What the tracker knows about one prefix."""

    key: int
    parent: int | None
    root: int
    end: int                       # prefix length in tokens
    hits: tuple[float, ...]        # the most recent hit times (at most hot_threshold)
    last_seen: float
    holders: frozenset[str]        # instance ids that served it
    pinned: frozenset[str] = frozenset()      # instances it is pinned on
    compressed: frozenset[str] = frozenset()  # instances it was compressed on since its last hit


@dataclass(frozen=True, slots=True)
class InstanceLoad:
    instance_id: str
    load: float | None = None      # in-flight (or running + waiting) / endpoint_capacity
    kv_usage: float | None = None  # 0..1, scraped from the backend


@dataclass(frozen=True, slots=True)
class Observations:
    prefixes: Sequence[PrefixStat]
    instances: Sequence[InstanceLoad]
    gateway_load: float = 0.0


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    instance_id: str
    location: str
    key: int
    end: int
    reason: str
    method: str | None = None      # compress only


@dataclass(slots=True)
class _View:
    """Derived facts about the prefix forest for one round."""

    stats: dict[int, PrefixStat]
    children: dict[int, list[int]] = field(default_factory=dict)
    held: dict[str, list[PrefixStat]] = field(default_factory=dict)  # instance -> prefixes it holds
    leaves: dict[str, list[PrefixStat]] = field(default_factory=dict)  # instance -> its cold leaves

    @classmethod
    def of(cls, prefixes: Sequence[PrefixStat]) -> _View:
        view = cls({p.key: p for p in prefixes})
        for p in prefixes:
            if p.parent is not None and p.parent in view.stats:
                view.children.setdefault(p.parent, []).append(p.key)
            for instance in p.holders:
                view.held.setdefault(instance, []).append(p)
        return view

    def is_cold(self, stat: PrefixStat, now: float, cold_after: float) -> bool:
        root = self.stats.get(stat.root, stat)
        return now - max(root.last_seen, stat.last_seen) >= cold_after

    def pinned_in_chain(self, stat: PrefixStat, instance: str) -> bool:
        """Is any prefix of `stat`'s chain (it, an ancestor or a descendant) pinned on `instance`?"""
        node: PrefixStat | None = stat
        while node is not None:
            if instance in node.pinned:
                return True
            node = self.stats.get(node.parent) if node.parent is not None else None
        stack = list(self.children.get(stat.key, ()))
        while stack:
            child = self.stats[stack.pop()]
            if instance in child.pinned:
                return True
            stack.extend(self.children.get(child.key, ()))
        return False


def hits_within(stat: PrefixStat, now: float, window: float) -> int:
    return sum(1 for t in stat.hits if now - t <= window)


def decide(obs: Observations, now: float, config: CacheStrategyConfig) -> list[Action]:
    """The actions to take now; no I/O. See the module docstring for the rules."""
    view = _View.of(obs.prefixes)
    actions: list[Action] = []
    if config.enable_pinning:
        actions += _pins(view, now, config)
    if config.enable_eviction:
        actions += _evictions(view, obs.instances, now, config)
    if config.enable_compression:
        evicting = {(a.instance_id, a.key) for a in actions if a.kind == "evict"}
        actions += [a for a in _compressions(view, obs, now, config) if (a.instance_id, a.key) not in evicting]
    return actions


def _pins(view: _View, now: float, config: CacheStrategyConfig) -> list[Action]:
    hot = {k for k, s in view.stats.items() if hits_within(s, now, config.hot_window) >= config.hot_threshold}
    longest = [view.stats[k] for k in hot if not any(c in hot for c in view.children.get(k, ()))]
    longest.sort(key=lambda s: (-s.end, s.key))
    actions = []
    for stat in longest:
        for instance in sorted(stat.holders - stat.pinned):
            actions.append(Action("pin", instance, config.pin_location, stat.key, stat.end,
                                  f"hot: {config.hot_threshold}+ hits in {config.hot_window:g}s"))
    return actions[: config.max_actions]


def _cold_leaves(view: _View, instance: str, now: float, config: CacheStrategyConfig) -> list[PrefixStat]:
    """Longest known prefixes held by `instance` whose whole chain is cold and unpinned there,
    coldest first (computed once per instance and round: eviction and compression share it)."""
    leaves = view.leaves.get(instance)
    if leaves is None:
        leaves = view.leaves[instance] = [
            s for s in view.held.get(instance, ())
            if not any(instance in view.stats[c].holders for c in view.children.get(s.key, ()))
            and view.is_cold(s, now, config.cold_after)
            and not view.pinned_in_chain(s, instance)
        ]
        leaves.sort(key=lambda s: (s.last_seen, -s.end, s.key))
    return leaves


def _evictions(view: _View, instances: Sequence[InstanceLoad], now: float,
               config: CacheStrategyConfig) -> list[Action]:
    actions = []
    for inst in instances:
        if inst.kv_usage is None or inst.kv_usage <= config.memory_threshold:
            continue
        reason = f"kv usage {inst.kv_usage:.2f} > {config.memory_threshold:g}"
        for stat in _cold_leaves(view, inst.instance_id, now, config)[: config.max_actions]:
            actions.append(Action("evict", inst.instance_id, config.evict_location, stat.key, stat.end, reason))
    return actions


def _compressions(view: _View, obs: Observations, now: float, config: CacheStrategyConfig) -> list[Action]:
    gateway_hot = obs.gateway_load > config.load_threshold
    actions = []
    for inst in obs.instances:
        loaded = inst.load is not None and inst.load > config.load_threshold
        if not (gateway_hot or loaded):
            continue
        reason = (f"backend load {inst.load:.2f}" if loaded and inst.load is not None
                  else f"gateway load {obs.gateway_load:.2f}") + f" > {config.load_threshold:g}"
        todo = [s for s in _cold_leaves(view, inst.instance_id, now, config) if inst.instance_id not in s.compressed]
        for stat in todo[: config.max_actions]:
            actions.append(Action("compress", inst.instance_id, config.compress_location, stat.key, stat.end,
                                  reason, method=config.compress_method))
    return actions

