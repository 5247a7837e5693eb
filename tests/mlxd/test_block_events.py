"""The MLX prefix cache as 16-token blocks: what its KV-event stream announces."""

from __future__ import annotations

import numpy as np

from mlxd.block_events import BlockTracker, block_hashes
from mlxd.prefix_cache import PrefixCache
from tests.kvproto.block_events import Events
from tests.mlxd.test_prefix_cache import RowCodec, kv_of


def _cache(capacity: int = 1000) -> tuple[PrefixCache, Events]:
    events = Events()
    return PrefixCache(RowCodec(), capacity, 0, block_events=events), events


def test_an_entry_announces_its_full_blocks() -> None:
    cache, events = _cache()
    a = list(range(40))
    cache.insert(a, kv_of(a))
    h = block_hashes(a)
    assert len(h) == 2
    assert events.log == [("stored", h, None, a[:32])]


def test_a_longer_entry_announces_only_the_blocks_it_adds() -> None:
    cache, events = _cache()
    a, longer = list(range(40)), list(range(60))
    cache.insert(a, kv_of(a))
    cache.insert(longer, kv_of(longer))  # subsumes a's entry: shared blocks stay held
    h = block_hashes(longer)
    assert events.log[1:] == [("stored", [h[2]], h[1], longer[32:48])]
    cache.insert(list(range(20)), kv_of(list(range(20))))  # covered by a longer entry: nothing new
    assert len(events.log) == 2


def test_eviction_removes_blocks_no_entry_holds() -> None:
    cache, events = _cache(capacity=50)
    a, b = list(range(32)), list(range(100, 132))
    cache.insert(a, kv_of(a))
    cache.insert(b, kv_of(b))  # over capacity: a's entry is dropped
    assert events.log[-1] == ("removed", sorted(block_hashes(a)))


def test_pinning_a_prefix_shares_blocks_and_clear_is_all_cleared() -> None:
    cache, events = _cache()
    a = list(range(48))
    cache.insert(a, kv_of(a))
    cache.pin(a[:20] + [999] * 20)  # a new pinned entry for a's first 20 tokens
    assert len(events.log) == 1
    cache.clear()
    assert events.log[-1] == ("cleared",)


def test_hashes_are_stable_and_chained() -> None:
    tokens = np.arange(64, dtype=np.int64)
    assert block_hashes(tokens) == block_hashes(list(range(64)))
    assert block_hashes(list(range(32)))[1] != block_hashes([0] * 16 + list(range(16, 32)))[1]
    tracker = BlockTracker(None)
    assert tracker.add(list(range(64))) == [] and len(tracker) == 0  # no sink: no work
