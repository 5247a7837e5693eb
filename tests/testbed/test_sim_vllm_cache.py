"""The simulated prefix cache: hits, LRU order, capacity, pins, and the LMCache chunk view."""

from __future__ import annotations

from contextlib import aclosing

import pytest

from kvproto.chunks import chunk_keys
from testbed.sim_vllm.cache import PrefixCache
from testbed.sim_vllm.engine import Engine, EngineConfig, RequestResult
from testbed.sim_vllm.tokenizer import HashTokenizer


def _serve(cache: PrefixCache, tokens: list[int]) -> int:
    """One request's cache traffic; returns its cached tokens."""
    hashes = cache.block_hashes(tokens)
    lease = cache.acquire(hashes, len(tokens))
    cache.insert(lease, hashes, tokens)
    cache.release(lease)
    return lease.hit_blocks * cache.block_size


def _prompt(seed: int, n: int) -> list[int]:
    return [seed * 100_000 + i for i in range(n)]


class Recorder:
    def __init__(self) -> None:
        self.admitted: list[int] = []
        self.evicted: list[int] = []


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def _cache(recorder: Recorder, capacity: int, block_size: int = 16) -> PrefixCache:
    return PrefixCache(
        block_size,
        capacity,
        chunk_keys=chunk_keys,
        on_admit=recorder.admitted.extend,
        on_evict=recorder.evicted.extend,
    )


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        (100, 100, 96),  # whole prompt cached: the last token is always recomputed, block-aligned
        (96, 96, 80),  # block-aligned prompt: its last block is recomputed
        (100, 150, 96),  # a longer prompt reuses the shorter one's full blocks
        (150, 100, 96),
        (15, 15, 0),  # no full block, no hit
    ],
)
def test_hit_is_the_longest_cached_block_prefix(
    recorder: Recorder, first: int, second: int, expected: int
) -> None:
    cache = _cache(recorder, 1000)
    assert _serve(cache, _prompt(1, first)) == 0
    assert _serve(cache, _prompt(1, second)) == expected


def test_a_different_first_block_misses_even_with_equal_tails(recorder: Recorder) -> None:
    cache = _cache(recorder, 1000)
    tokens = _prompt(1, 64)
    _serve(cache, tokens)
    assert _serve(cache, [999_999, *tokens[1:]]) == 0


def test_lru_evicts_the_least_recently_used_prompt_tail_first(recorder: Recorder) -> None:
    cache = _cache(recorder, capacity=8)
    a, b = _prompt(1, 64), _prompt(2, 64)  # 4 blocks each: the cache is full
    _serve(cache, a)
    _serve(cache, b)
    _serve(cache, a)  # a is now most recent
    c = _prompt(3, 32)  # needs 2 blocks: b's two tail blocks go
    _serve(cache, c)
    assert len(cache) == 8
    assert cache.cached_prefix_blocks(cache.block_hashes(a)) == 4
    assert cache.cached_prefix_blocks(cache.block_hashes(b)) == 2
    assert cache.stats()["evictions"] == 2


def test_blocks_in_use_are_not_evicted_and_overflow_is_not_cached(recorder: Recorder) -> None:
    cache = _cache(recorder, capacity=4)
    a = _prompt(1, 64)
    hashes = cache.block_hashes(a)
    lease = cache.acquire(hashes, len(a))
    cache.insert(lease, hashes, a)  # a's 4 blocks are in use by a running request
    b = _prompt(2, 64)
    assert _serve(cache, b) == 0
    assert cache.cached_prefix_blocks(cache.block_hashes(b)) == 0
    assert cache.cached_prefix_blocks(hashes) == 4
    cache.release(lease)
    _serve(cache, b)
    assert cache.cached_prefix_blocks(cache.block_hashes(b)) == 4


def test_pinned_prefix_survives_pressure_and_clear_drops_it(recorder: Recorder) -> None:
    cache = _cache(recorder, capacity=8)
    a = _prompt(1, 64)
    _serve(cache, a)
    assert cache.pin(a + [7, 7]) == 64
    for seed in range(2, 6):
        _serve(cache, _prompt(seed, 64))
    assert cache.cached_prefix_blocks(cache.block_hashes(a)) == 4
    assert cache.clear() == 8 * 16
    assert len(cache) == 0


def test_full_chunks_are_admitted_once_and_evicted_with_their_blocks(recorder: Recorder) -> None:
    cache = _cache(recorder, capacity=40)  # 640 tokens
    a = _prompt(1, 600)  # two full 256-token chunks (and 88 tokens that are not one)
    _serve(cache, a)
    keys = chunk_keys(a)
    assert recorder.admitted == keys and len(keys) == 2
    _serve(cache, a)
    assert recorder.admitted == keys, "a hit admits nothing new"
    _serve(
        cache, _prompt(2, 300)
    )  # needs 18 blocks: a loses its tail, including the 2nd chunk's last block
    assert recorder.evicted == [keys[1]]
    assert cache.cached_prefix_blocks(cache.block_hashes(a)) * 16 < 512
    cache.clear()
    assert sorted(recorder.evicted) == sorted([*keys, *chunk_keys(_prompt(2, 300))])


def test_evicting_a_block_drops_its_descendants(recorder: Recorder) -> None:
    cache = _cache(recorder, capacity=100)
    a = _prompt(1, 512)
    _serve(cache, a)
    assert cache.evict_prefix(a[:16]) == 512
    assert len(cache) == 0
    assert sorted(recorder.evicted) == sorted(chunk_keys(a))


def test_compressed_blocks_are_restored_by_a_hit(recorder: Recorder) -> None:
    cache = _cache(recorder, capacity=100)
    a = _prompt(1, 64)
    _serve(cache, a)
    assert cache.set_compressed(a, True) == 64
    hashes = cache.block_hashes(a)
    lease = cache.acquire(hashes, len(a))
    assert lease.decompressed_tokens == 48  # 3 blocks hit (the last is recomputed)
    cache.release(lease)
    assert cache.stats()["compressed_blocks"] == 1


@pytest.mark.parametrize(("block_size", "capacity"), [(0, 10), (24, 10), (16, 0)])
def test_bad_sizes_are_rejected(block_size: int, capacity: int) -> None:
    with pytest.raises(ValueError):
        PrefixCache(block_size, capacity)


async def test_sim_kv_cache_usage_counts_a_running_request_s_blocks_once() -> None:
    """A running request's prompt blocks were counted twice: once as cached blocks it
    references and again in its private reservation, so usage read about double."""
    config = EngineConfig(block_size=16, capacity_blocks=1000, prefill_rate=1e6, decode_rate=50.0)
    engine = Engine(config, HashTokenizer(), PrefixCache(config.block_size, config.capacity_blocks))
    prompt, max_tokens = list(range(800)), 16  # 50 full prompt blocks; 51 blocks with the output
    result = RequestResult(len(prompt))
    async with aclosing(engine.generate(prompt, max_tokens, result)) as tokens:
        await anext(tokens)  # prefilled and decoding
        assert engine.kv_cache_usage() == pytest.approx(51 / 1000)
    assert engine.kv_cache_usage() == 0
