"""decide(): table tests of the pin / compress / evict rules (pure, no I/O)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from filters.cache_strategy import (
    Action,
    CacheStrategyConfig,
    InstanceLoad,
    Observations,
    PrefixStat,
    decide,
)
from kvkernel.decode import ConfigError, decode_dataclass

NOW = 10_000.0
CFG = CacheStrategyConfig(enable_pinning=True, enable_compression=True, enable_eviction=True,
                          hot_window=60.0, hot_threshold=3, cold_after=30.0, load_threshold=0.7,
                          memory_threshold=0.85, max_actions=8)


def stat(key: int, parent: int | None, root: int, *, hits: tuple[float, ...] = (), last: float | None = None,
         holders: tuple[str, ...] = ("a",), pinned: tuple[str, ...] = (), compressed: tuple[str, ...] = ()
         ) -> PrefixStat:
    depth = 1 if parent is None else 2
    return PrefixStat(key, parent, root, 256 * depth, hits, last if last is not None else max(hits, default=0.0),
                      frozenset(holders), frozenset(pinned), frozenset(compressed))


def hot(n: int = 3, at: float = NOW - 1) -> tuple[float, ...]:
    return tuple(at - i for i in range(n))


# A shared prefix chain 1 -> 2 with three request-specific tails 3, 4, 5.
SHARED = [stat(1, None, 1, hits=hot(3)), stat(2, 1, 1, hits=hot(3))]
TAILS = [stat(k, 2, 1, hits=hot(1)) for k in (3, 4, 5)]
COLD = [stat(10, None, 10, hits=(NOW - 500,)), stat(11, 10, 10, hits=(NOW - 400,))]
IDLE = [InstanceLoad("a", 0.1, 0.2), InstanceLoad("b", 0.1, 0.2)]


def kinds(actions: list[Action]) -> list[tuple[str, str, int]]:
    return [(a.kind, a.instance_id, a.key) for a in actions]


@pytest.mark.parametrize("name,prefixes,instances,gateway_load,config,expected", [
    ("hot shared prefix pinned at its longest hot key", SHARED + TAILS, IDLE, 0.0, CFG, [("pin", "a", 2)]),
    ("hits older than the window do not count",
     [stat(1, None, 1, hits=hot(3, NOW - 61)), stat(2, 1, 1, hits=(NOW - 1, NOW - 2, NOW - 100))],
     IDLE, 0.0, CFG, []),
    ("two hits are below the threshold", [stat(1, None, 1, hits=hot(2))], IDLE, 0.0, CFG, []),
    ("already pinned: nothing", [stat(1, None, 1, hits=hot(3), pinned=("a",))], IDLE, 0.0, CFG, []),
    ("pinned on one holder: pin on the other only",
     [stat(1, None, 1, hits=hot(3), holders=("a", "b"), pinned=("a",))], IDLE, 0.0, CFG, [("pin", "b", 1)]),
    ("pinning disabled", SHARED, IDLE, 0.0, replace(CFG, enable_pinning=False), []),
    ("memory pressure evicts the cold chain's leaf, never the hot one",
     SHARED + COLD, [InstanceLoad("a", 0.1, 0.9)], 0.0, CFG, [("pin", "a", 2), ("evict", "a", 11)]),
    ("no memory pressure: no eviction", COLD, IDLE, 0.0, CFG, []),
    ("kv usage exactly at the threshold is not over it", COLD, [InstanceLoad("a", 0.1, 0.85)], 0.0, CFG, []),
    ("a cold tail under a warm root is kept (evicting it would evict the root)",
     [stat(1, None, 1, hits=(NOW - 1,)), stat(2, 1, 1, hits=(NOW - 500,))],
     [InstanceLoad("a", 0.1, 0.99)], 0.0, CFG, []),
    ("a pinned cold chain is neither evicted nor compressed",
     [stat(10, None, 10, hits=(NOW - 500,), pinned=("a",)), stat(11, 10, 10, hits=(NOW - 400,))],
     [InstanceLoad("a", 0.9, 0.99)], 0.0, CFG, []),
    ("only the loaded backend compresses its cold prefixes",
     COLD + [stat(12, None, 12, hits=(NOW - 500,), holders=("b",))],
     [InstanceLoad("a", 0.9, 0.2), InstanceLoad("b", 0.1, 0.2)], 0.0, CFG, [("compress", "a", 11)]),
    ("gateway load compresses everywhere",
     [stat(10, None, 10, hits=(NOW - 500,), holders=("a", "b")),
      stat(11, 10, 10, hits=(NOW - 400,), holders=("a", "b"))],
     IDLE, 0.8, CFG, [("compress", "a", 11), ("compress", "b", 11)]),
    ("already compressed: not again", [stat(10, None, 10, hits=(NOW - 500,), compressed=("a",))],
     [InstanceLoad("a", 0.9, 0.2)], 0.0, CFG, []),
    ("evicted prefixes are not also compressed", COLD, [InstanceLoad("a", 0.9, 0.9)], 0.0, CFG,
     [("evict", "a", 11)]),
    ("unknown load never triggers anything", COLD, [InstanceLoad("a", None, None)], 0.0, CFG, []),
])
def test_decide(name: str, prefixes: list[PrefixStat], instances: list[InstanceLoad], gateway_load: float,
                config: CacheStrategyConfig, expected: list[tuple[str, str, int]]) -> None:
    actions = decide(Observations(prefixes, instances, gateway_load), NOW, config)
    assert kinds(actions) == expected, name


def test_actions_carry_locations_method_and_length() -> None:
    actions = decide(Observations(SHARED + COLD, [InstanceLoad("a", 0.9, 0.95)]), NOW,
                     replace(CFG, pin_location="LocalDiskBackend", compress_method="cachegen"))
    pin = next(a for a in actions if a.kind == "pin")
    assert (pin.location, pin.end) == ("LocalDiskBackend", 512)
    assert "hot" in pin.reason
    evict = next(a for a in actions if a.kind == "evict")
    assert evict.location == CFG.evict_location and "kv usage 0.95" in evict.reason


def test_max_actions_bounds_each_kind() -> None:
    many = [stat(100 + i, None, 100 + i, hits=hot(3)) for i in range(20)]
    actions = decide(Observations(many, IDLE), NOW, replace(CFG, max_actions=5))
    assert len(actions) == 5


def test_coldest_evicted_first() -> None:
    chains = [stat(20 + i, None, 20 + i, hits=(NOW - 1000 + i * 100,)) for i in range(4)]
    actions = decide(Observations(chains, [InstanceLoad("a", 0.0, 0.99)]), NOW, replace(CFG, max_actions=2))
    assert kinds(actions) == [("evict", "a", 20), ("evict", "a", 21)]


@pytest.mark.parametrize("raw,error", [
    ({"hot_threshold": 0}, "cache_strategy.hot_threshold: must be >= 1, got 0"),
    ({"memory_threshold": 1.5}, "cache_strategy.memory_threshold: must be in (0, 1]"),
    ({"hot_window": "10m", "retention": "5m"}, "cache_strategy.retention: must be >= hot_window"),
    ({"pin_locaton": "x"}, "cache_strategy.pin_locaton: unknown key"),
])
def test_config_errors_name_the_field(raw: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        decode_dataclass(CacheStrategyConfig, raw, "cache_strategy")
    assert error in str(info.value)


def test_issue_yaml_keys_decode() -> None:
    raw = {"enable_pinning": True, "hot_window": "5m", "hot_threshold": 10, "pin_location": "LocalCPUBackend",
           "enable_compression": True, "load_threshold": 0.7, "compress_method": "zstd",
           "compress_location": "LocalCPUBackend", "enable_eviction": True, "memory_threshold": 0.85}
    cfg = decode_dataclass(CacheStrategyConfig, raw, "cache_strategy")
    assert cfg.hot_window == 300.0 and cfg.enabled
