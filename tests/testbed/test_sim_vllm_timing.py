"""The simulator's timing model, measured by ratios and ordering (no absolute timed asserts)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import aclosing

from testbed.sim_vllm.cache import PrefixCache
from testbed.sim_vllm.engine import Engine, EngineConfig, RequestResult
from testbed.sim_vllm.tokenizer import HashTokenizer


def _engine(**overrides: float) -> Engine:
    config = EngineConfig(**{"prefill_rate": 10_000.0, "decode_rate": 200.0, **overrides})  # type: ignore[arg-type]
    return Engine(config, HashTokenizer(), PrefixCache(config.block_size, config.capacity_blocks))


async def _run(engine: Engine, prompt: list[int], max_tokens: int) -> tuple[RequestResult, float]:
    """Run one request to completion; returns its result and its end-to-end seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    result = RequestResult(len(prompt))
    async with aclosing(engine.generate(prompt, max_tokens, result)) as tokens:
        out = [t async for t in tokens]
    assert len(out) == max_tokens == result.output_tokens
    return result, loop.time() - start


async def _until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll engine counters with a deadline."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - plain counters, no event to wait on
            await asyncio.sleep(0.001)


async def test_ttft_falls_with_a_cached_prefix() -> None:
    engine = _engine()
    system = list(range(3000))  # 0.3 s to prefill at 10k tokens/s
    cold, _ = await _run(engine, [*system, 1, 2, 3], 1)
    warm, _ = await _run(engine, [*system, 4, 5, 6], 1)
    assert cold.cached_tokens == 0
    assert warm.cached_tokens == 3000 - 3000 % 16
    assert warm.ttft_s * 5 < cold.ttft_s, (warm.ttft_s, cold.ttft_s)


async def test_ttft_grows_with_uncached_prompt_length() -> None:
    engine = _engine()
    short, _ = await _run(engine, list(range(500)), 1)
    long_, _ = await _run(engine, list(range(10_000, 13_000)), 1)
    assert long_.ttft_s > 3 * short.ttft_s


async def test_decode_time_scales_with_max_tokens() -> None:
    engine = _engine(decode_rate=100.0)
    _, few = await _run(engine, list(range(20)), 2)
    _, many = await _run(engine, list(range(100, 120)), 12)
    assert many > 3 * few


async def test_concurrency_limit_queues_requests_in_order() -> None:
    engine = _engine(max_num_seqs=1, decode_rate=100.0)
    prompts = [list(range(i * 1000, i * 1000 + 100)) for i in range(3)]
    first = asyncio.create_task(_run(engine, prompts[0], 10))
    await _until(lambda: engine.stats.running == 1)
    rest = [asyncio.create_task(_run(engine, p, 10)) for p in prompts[1:]]
    await _until(lambda: engine.stats.waiting == 2)
    assert engine.stats.running == 1
    (r0, e2e0), (r1, _), (r2, _) = await asyncio.gather(first, *rest)
    assert r0.queued_s < r1.queued_s < r2.queued_s
    # The second request could only start once the first released its slot.
    assert r1.queued_s >= 0.9 * (e2e0 - r0.queued_s) - 0.005
    assert r1.ttft_s > r1.queued_s
    assert engine.stats.running == engine.stats.waiting == 0


async def test_sequences_up_to_the_limit_run_together() -> None:
    engine = _engine(max_num_seqs=3, decode_rate=50.0)
    tasks = [
        asyncio.create_task(_run(engine, list(range(i * 100, i * 100 + 20)), 5)) for i in range(3)
    ]
    await _until(lambda: engine.stats.running == 3)
    assert engine.stats.waiting == 0
    results = await asyncio.gather(*tasks)
    assert all(r.queued_s < 0.05 for r, _ in results)


async def test_prefill_slots_serialise_prefill() -> None:
    engine = _engine(max_num_seqs=4, prefill_slots=1)
    prompts = [list(range(i * 5000, i * 5000 + 2000)) for i in range(2)]  # 0.2 s each
    (a, _), (b, _) = await asyncio.gather(*(_run(engine, p, 1) for p in prompts))
    slow, fast = max(a.ttft_s, b.ttft_s), min(a.ttft_s, b.ttft_s)
    assert slow > 1.6 * fast


async def test_a_cancelled_request_frees_its_slot_and_blocks() -> None:
    engine = _engine(max_num_seqs=1, decode_rate=20.0)
    task = asyncio.create_task(_run(engine, list(range(64)), 100))
    await _until(lambda: engine.stats.generation_tokens > 0)  # prefilled, now decoding
    assert engine.kv_cache_usage() > 0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert engine.stats.running == 0
    assert engine.kv_cache_usage() == 0
    result, _ = await _run(engine, list(range(64)), 1)
    assert result.queued_s < 0.05 and result.cached_tokens == 48


async def test_a_request_queued_for_prefill_counts_as_waiting_until_its_prefill_starts() -> None:
    """As in vLLM: another router sees the queued prefills in num_requests_waiting."""
    engine = _engine(max_num_seqs=4, prefill_slots=1, prefill_rate=2_000.0)
    prompts = [list(range(i * 5000, i * 5000 + 1000)) for i in range(3)]  # 0.5 s of prefill each
    tasks = [asyncio.create_task(_run(engine, p, 1)) for p in prompts]
    await _until(lambda: engine.stats.running == 1)
    assert engine.stats.waiting == 2  # holding sequence slots, queued behind the prefill
    await asyncio.gather(*tasks)
    assert engine.stats.running == engine.stats.waiting == 0


async def test_the_previous_gauge_counts_a_queued_prefill_as_running() -> None:
    engine = _engine(max_num_seqs=4, prefill_slots=1, prefill_rate=2_000.0, waiting_until_prefill=False)
    tasks = [asyncio.create_task(_run(engine, list(range(i * 5000, i * 5000 + 1000)), 1)) for i in range(3)]
    await _until(lambda: engine.stats.running == 3)
    assert engine.stats.waiting == 0
    await asyncio.gather(*tasks)
