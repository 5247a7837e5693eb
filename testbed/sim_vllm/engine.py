"""The modelled engine: admission, prefill against the prefix cache, decode.

Timing model (all rates are flags, see `EngineConfig`):

- A request waits for one of `max_num_seqs` sequence slots (FIFO), then for one
  of `prefill_slots` prefill slots (default 1: prefill is compute-bound, so
  concurrent prefills queue). Until its prefill starts it counts in
  `num_requests_waiting` (vLLM's scheduler keeps a request waiting until it
  schedules its first tokens), afterwards in `num_requests_running`, so another
  router's queued prefills show in the gauge (`waiting_until_prefill=False`:
  running from its sequence slot on, the count before). Inside the slot the prefix cache
  is consulted and the prompt's missing full blocks are added to it at once (as
  vLLM caches blocks when it schedules their computation: this is when their KV
  events are published), then the engine sleeps `base_latency + uncached /
  prefill_rate` (plus `decompressed / decompress_rate` for compressed blocks it
  had to restore). A prefill cancelled midway drops the blocks it added.
- TTFT = queueing + prefill; the first token is emitted at TTFT.
- Decode slows down with the batch: each further token takes
  `tpot(running) = (1 / decode_rate) * (1 + decode_batch_penalty * (running - 1))`
  seconds, `running` being the sequences holding a slot when the token is
  scheduled (the same count as `vllm:num_requests_running`). With the default
  penalty 0.05, 8 running sequences make every token 35% slower, 16 make it 75%
  slower: piling every request of a hot prefix onto one replica costs decode time.
"""

from __future__ import annotations

import asyncio
import bisect
import random
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

from testbed.sim_vllm.cache import Lease, PrefixCache
from testbed.sim_vllm.tokenizer import SimTokenizer

# vLLM's buckets for vllm:time_to_first_token_seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    block_size: int = 16
    capacity_blocks: int = 8192
    max_num_seqs: int = 16
    prefill_slots: int = 1
    prefill_rate: float = 8000.0  # tokens/s
    decode_rate: float = 100.0  # tokens/s per sequence
    decompress_rate: float = 200000.0  # tokens/s
    base_latency: float = 0.0  # s added to every prefill
    decode_batch_penalty: float = 0.05  # TPOT growth per extra running sequence, see tpot()
    max_model_len: int = 8192
    # True: a request counts as waiting until its prefill starts (vLLM when its token budget
    # holds one prefill at a time); False: from when it gets a sequence slot (a budget that
    # schedules every admitted prefill at once, sharing the compute).
    waiting_until_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("capacity_blocks", "max_num_seqs", "prefill_slots", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("prefill_rate", "decode_rate", "decompress_rate"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.base_latency < 0:
            raise ValueError(f"base_latency must be >= 0, got {self.base_latency}")
        if self.decode_batch_penalty < 0:
            raise ValueError(f"decode_batch_penalty must be >= 0, got {self.decode_batch_penalty}")

    def tpot(self, running: int) -> float:
        """Seconds per output token with `running` sequences decoding together (running >= 1)."""
        return (1 + self.decode_batch_penalty * (max(1, running) - 1)) / self.decode_rate


@dataclass(slots=True)
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1


@dataclass(slots=True)
class EngineStats:
    """Counters behind /metrics (names follow vLLM's)."""

    running: int = 0
    waiting: int = 0
    prefix_queries: int = 0  # prompt tokens looked up
    prefix_hits: int = 0  # of which cached
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))


@dataclass(slots=True)
class RequestResult:
    """Filled in by `Engine.generate` while it runs: cached_tokens and ttft are set before the first token."""

    prompt_tokens: int
    cached_tokens: int = 0
    output_tokens: int = 0
    queued_s: float = 0.0
    ttft_s: float = 0.0
    finish_reason: str = "length"


class Engine:
    def __init__(self, config: EngineConfig, tokenizer: SimTokenizer, cache: PrefixCache) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.cache = cache
        self.stats = EngineStats()
        self._seq_slots = asyncio.Semaphore(config.max_num_seqs)
        self._prefill_slots = asyncio.Semaphore(config.prefill_slots)
        self._private_blocks = 0

    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks in use by running requests (cached idle blocks count as free, as in vLLM)."""
        used = self.cache.referenced_blocks + self._private_blocks
        return min(1.0, used / self.cache.capacity_blocks)

    async def generate(
        self, prompt: Sequence[int], max_tokens: int, result: RequestResult
    ) -> AsyncGenerator[int, None]:
        """Yield `max_tokens` output ids on the modelled schedule. Always close it (`aclosing`)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.stats.waiting += 1
        try:
            await self._seq_slots.acquire()
        except BaseException:
            self.stats.waiting -= 1
            raise
        result.queued_s = loop.time() - start
        private = -(-(len(prompt) + max_tokens) // self.cache.block_size)
        self._private_blocks += private
        lease = None
        scheduled = False

        def schedule() -> None:  # waiting -> running, once
            nonlocal scheduled
            if not scheduled:
                scheduled = True
                self.stats.waiting -= 1
                self.stats.running += 1

        if not self.config.waiting_until_prefill:
            schedule()
        try:
            lease = await self._prefill(prompt, result, schedule)
            # The prompt blocks now in the cache count as referenced blocks; keep
            # only the rest (partial tail block, output) private, or they count twice.
            shared = min(private, len(lease.hashes))
            private -= shared
            self._private_blocks -= shared
            result.ttft_s = loop.time() - start
            self.stats.ttft.observe(result.ttft_s)
            rng = random.Random(hash(tuple(prompt[-64:])) ^ len(prompt))
            due = loop.time()
            for i, token in enumerate(self.tokenizer.sample(rng, max_tokens)):
                if i:
                    # Scheduled from the previous token's due time, so event-loop lag does not accumulate.
                    due += self.config.tpot(self.stats.running)
                    await asyncio.sleep(max(0.0, due - loop.time()))
                result.output_tokens += 1
                self.stats.generation_tokens += 1
                yield token
            self._finish(result, "length" if max_tokens else "stop", loop.time() - start)
        finally:
            self._private_blocks -= private
            if lease is not None:
                self.cache.release(lease)
            if scheduled:
                self.stats.running -= 1
            else:
                self.stats.waiting -= 1
            self._seq_slots.release()

    async def _prefill(self, prompt: Sequence[int], result: RequestResult, schedule: Callable[[], None]) -> Lease:
        hashes = self.cache.block_hashes(prompt)
        async with self._prefill_slots:
            schedule()
            lease = self.cache.acquire(hashes, len(prompt))
            created: list[int] = []
            try:
                cached = lease.hit_blocks * self.cache.block_size
                result.cached_tokens = cached
                self.stats.prefix_queries += len(prompt)
                self.stats.prefix_hits += cached
                self.stats.prompt_tokens += len(prompt)
                cfg = self.config
                delay = (cfg.base_latency + (len(prompt) - cached) / cfg.prefill_rate
                         + lease.decompressed_tokens / cfg.decompress_rate)
                created = self.cache.insert(lease, hashes, prompt)
                await asyncio.sleep(delay)
            except BaseException:
                self.cache.release(lease)
                self.cache.discard(created)
                raise
        return lease

    def _finish(self, result: RequestResult, reason: str, e2e_s: float) -> None:
        result.finish_reason = reason
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        self.stats.e2e.observe(e2e_s)
