"""Per-request token samplers (temperature, top_p, seed) for mlx-lm's BatchGenerator.

Greedy requests get `None`, which makes the batch use its shared argmax sampler
(one batched call). A seeded sampler owns its PRNG key, so its draws do not depend
on what other requests in the batch do. Call only from the MLX engine thread.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p

Sampler = Callable[[mx.array], mx.array]


def make_sampler(temperature: float, top_p: float = 1.0, seed: int | None = None) -> Sampler | None:
    """A sampler over log-probabilities of shape (1, vocab), or None for greedy decoding."""
    if temperature <= 0:
        return None
    # mx.random.key takes an unsigned 64-bit seed; requests carry signed int64 (as vLLM's).
    key = mx.random.key(seed % 2**64) if seed is not None else None

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        logits = logprobs * (1.0 / temperature)
        if key is None:
            return mx.random.categorical(logits)
        key, sub = mx.random.split(key)
        return mx.random.categorical(logits, key=sub)

    return sample
