"""PrefixCache: longest-prefix reuse, LRU capacity, pins, cold tier, chunk admit/evict accounting.

The KV here is a numpy array with one row per token (row i = token i's "KV"), packed
with zstd like the real codec, so slicing and restoring are checked for content.
"""

from __future__ import annotations

import numpy as np
import pytest
import zstandard

from kvproto.chunks import chunk_keys
from mlxd.prefix_cache import PrefixCache


class RowCodec:
    def length(self, kv: np.ndarray) -> int:
        return len(kv)

    def slice(self, kv: np.ndarray, n: int) -> np.ndarray:
        return kv[:n].copy()

    def pack(self, kv: np.ndarray) -> bytes:
        return zstandard.compress(kv.astype(np.int64).tobytes())

    def unpack(self, blob: bytes) -> np.ndarray:
        return np.frombuffer(zstandard.decompress(blob), dtype=np.int64).copy()


def kv_of(tokens: list[int]) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int64) * 10


class Recorder:
    def __init__(self) -> None:
        self.admitted: list[int] = []
        self.evicted: list[int] = []


def make(capacity: int = 10_000, cold: int = 0) -> tuple[PrefixCache, Recorder]:
    rec = Recorder()
    cache = PrefixCache(RowCodec(), capacity, cold, on_admit=rec.admitted.extend, on_evict=rec.evicted.extend)
    return cache, rec


def seq(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_longest_prefix_wins_and_kv_is_exactly_that_prefix() -> None:
    cache, _ = make()
    cache.insert(seq(0, 100), kv_of(seq(0, 100)))
    cache.insert(seq(0, 40) + seq(500, 60), kv_of(seq(0, 40) + seq(500, 60)))
    query = seq(0, 70) + [9999]
    match = cache.lookup(query)
    assert match.n == 70
    assert np.array_equal(match.kv, kv_of(seq(0, 70)))
    assert cache.lookup([7, 7, 7]).n == 0


def test_lookup_limit_leaves_tokens_to_prefill() -> None:
    cache, _ = make()
    cache.insert(seq(0, 50), kv_of(seq(0, 50)))
    assert cache.lookup(seq(0, 50), limit=49).n == 49


def test_chunks_are_admitted_once_and_evicted_when_no_entry_holds_them() -> None:
    cache, rec = make(capacity=1000)
    a = seq(0, 600)
    cache.insert(a, kv_of(a))
    assert rec.admitted == chunk_keys(a)  # two full chunks; the 88-token tail is not reported
    b = seq(0, 512) + seq(5000, 100)
    cache.insert(b, kv_of(b))
    assert rec.admitted == chunk_keys(a)  # b's chunks are a's chunks
    c = seq(9000, 600)
    cache.insert(c, kv_of(c))  # 1800 tokens > 1000: least recently used entries go
    assert cache.stats.hot_tokens <= 1000
    assert rec.admitted == chunk_keys(a) + chunk_keys(c)
    assert sorted(rec.evicted) == sorted(chunk_keys(a))
    assert cache.held_keys() == set(chunk_keys(c))


def test_longer_entry_subsumes_its_prefix() -> None:
    cache, rec = make()
    cache.insert(seq(0, 300), kv_of(seq(0, 300)))
    cache.insert(seq(0, 700), kv_of(seq(0, 700)))
    assert [e.size for e in cache.entries()] == [700]
    assert cache.insert(seq(0, 300), kv_of(seq(0, 300))) == 0  # already covered
    assert rec.evicted == []


def test_pinned_prefix_survives_capacity_pressure() -> None:
    cache, rec = make(capacity=600)
    sys_prompt = seq(0, 512)
    cache.insert(sys_prompt + [1, 2, 3], kv_of(sys_prompt + [1, 2, 3]))
    assert cache.pin(sys_prompt + [42]) == 512
    for i in range(3):
        other = seq(10_000 * (i + 1), 300)
        cache.insert(other, kv_of(other))
    assert cache.lookup(sys_prompt + [7]).n == 512
    assert not set(chunk_keys(sys_prompt)) & set(rec.evicted)
    assert cache.clear() > 0 and cache.held_keys() == set()
    assert set(chunk_keys(sys_prompt)) <= set(rec.evicted)


def test_cold_tier_compresses_lru_and_a_hit_restores_it() -> None:
    cache, rec = make(capacity=600, cold=10_000)
    a, b = seq(0, 512), seq(1000, 512)
    cache.insert(a, kv_of(a))
    cache.insert(b, kv_of(b))  # pushes a to the cold tier
    assert cache.stats.cold_tokens == 512 and cache.stats.hot_tokens == 512
    assert cache.held_keys() == set(chunk_keys(a)) | set(chunk_keys(b))  # cold still counts as held
    match = cache.lookup(a + [1])
    assert match.n == 512 and match.restored
    assert np.array_equal(match.kv, kv_of(a))
    assert cache.stats.restores == 1 and cache.stats.cold_tokens == 512  # b went cold in turn
    assert rec.evicted == []


def test_cold_tier_capacity_drops_oldest() -> None:
    cache, rec = make(capacity=300, cold=300)
    for i in range(3):
        s = seq(1000 * i, 256)
        cache.insert(s, kv_of(s))
    assert cache.stats.hot_tokens == 256 and cache.stats.cold_tokens == 256
    assert rec.evicted == chunk_keys(seq(0, 256))


def test_explicit_compress_and_decompress() -> None:
    cache, _ = make(cold=10_000)
    a = seq(0, 400)
    cache.insert(a, kv_of(a))
    assert cache.compress(a + [5]) == 400
    assert cache.stats.hot_tokens == 0 and cache.stats.cold_tokens == 400 and cache.stats.cold_bytes > 0
    assert cache.decompress(None) == 400
    assert cache.stats.hot_tokens == 400
    assert cache.compress([123456]) == 0


def test_negative_capacity_is_rejected() -> None:
    with pytest.raises(ValueError):
        PrefixCache(RowCodec(), -1)
