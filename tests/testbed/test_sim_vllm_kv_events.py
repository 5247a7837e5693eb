"""sim-vllm's block events (what its KV-event stream is made of) and its decode slowdown model."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from testbed.sim_vllm.cache import PrefixCache
from testbed.sim_vllm.engine import Engine, EngineConfig, RequestResult
from testbed.sim_vllm.tokenizer import load_tokenizer
from tests.kvproto.block_events import Events


def _cache(capacity: int = 64) -> tuple[PrefixCache, Events]:
    events = Events()
    return PrefixCache(4, capacity, chunk_size=16, block_events=events), events


def _run(cache: PrefixCache, tokens: list[int], keep: bool = False) -> None:
    hashes = cache.block_hashes(tokens)
    lease = cache.acquire(hashes, len(tokens))
    cache.insert(lease, hashes, tokens)
    if not keep:
        cache.release(lease)


def test_insert_announces_new_full_blocks_with_parent_and_tokens() -> None:
    cache, events = _cache()
    a = list(range(10))  # two full blocks, a partial one
    _run(cache, a)
    h = cache.block_hashes(a + [10, 11])
    assert events.log == [("stored", h[:2], None, a[:8])]
    _run(cache, a + [10, 11, 12])  # one more full block after the cached two
    assert events.log[-1] == ("stored", [h[2]], h[1], [8, 9, 10, 11])
    _run(cache, a)  # nothing new
    assert len(events.log) == 2


def test_eviction_removes_the_hashes_that_were_stored() -> None:
    cache, events = _cache(capacity=2)
    _run(cache, list(range(8)))
    _run(cache, list(range(100, 108)))
    stored = [e[1] for e in events.log if e[0] == "stored"]
    removed = [e[1] for e in events.log if e[0] == "removed"]
    assert sorted(sum(removed, [])) == sorted(stored[0])
    assert [e[0] for e in events.log] == ["stored", "removed", "removed", "stored"]  # room made before the store


def test_clear_is_all_blocks_cleared_unless_blocks_are_in_use() -> None:
    cache, events = _cache()
    _run(cache, list(range(8)))
    _run(cache, list(range(100, 108)), keep=True)
    cache.clear()
    assert events.log[-1] == ("removed", sorted(cache.block_hashes(list(range(8)))))
    cache, events = _cache()
    _run(cache, list(range(8)))
    cache.clear()
    assert events.log[-1] == ("cleared",)


async def test_blocks_are_stored_when_prefill_starts_and_dropped_if_it_is_cancelled() -> None:
    events = Events()
    cache = PrefixCache(16, 64, block_events=events)
    engine = Engine(EngineConfig(prefill_rate=10.0), load_tokenizer(None), cache)
    prompt = list(range(40))
    task = asyncio.create_task(_generate(engine, prompt))
    deadline = asyncio.get_running_loop().time() + 5
    while not events.log:
        assert asyncio.get_running_loop().time() < deadline, "no BlockStored while prefilling"
        await asyncio.sleep(0.005)
    hashes = cache.block_hashes(prompt)
    assert events.log == [("stored", hashes, None, prompt[:32])]  # prefill takes 4 s; we are well inside it
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events.log[-1] == ("removed", sorted(hashes))
    assert len(cache) == 0


async def _generate(engine: Engine, prompt: list[int]) -> None:
    async with aclosing(engine.generate(prompt, 1, RequestResult(len(prompt)))) as tokens:
        async for _ in tokens:
            pass


def test_tpot_grows_with_running_sequences() -> None:
    config = EngineConfig(decode_rate=100.0, decode_batch_penalty=0.05)
    assert config.tpot(1) == pytest.approx(0.01)
    assert config.tpot(8) / config.tpot(1) == pytest.approx(1.35)
    assert config.tpot(16) / config.tpot(1) == pytest.approx(1.75)
    assert EngineConfig().decode_batch_penalty > 0  # the default makes hot-spotting cost something
    flat = EngineConfig(decode_rate=100.0, decode_batch_penalty=0.0)
    assert flat.tpot(8) == flat.tpot(1)
    with pytest.raises(ValueError, match="decode_batch_penalty"):
        EngineConfig(decode_batch_penalty=-0.1)
