"""Chunk keys exactly as LMCache computes them (checked against lmcache 0.5.6).

LMCache's `ChunkedTokenDatabase` splits a token sequence into 256-token chunks and
chains a prefix hash through them: each key is CPython's built-in `hash` of the
3-tuple `(previous_key, tuple(chunk_tokens), ())`, starting from `NONE_HASH = 0`
when vLLM is not importable beside the controller. A tuple of ints hashes the
same in every process (string hashing is what PYTHONHASHSEED randomises), so a
worker and the controller agree without sharing a seed.

Workers report FULL chunks only; the controller's `/lookup` also hashes a trailing
partial chunk, which therefore never matches (`chunk_spans(..., partial=True)`).
"""

from __future__ import annotations

from collections.abc import Sequence

CHUNK_SIZE = 256
# LMCache's initial prefix hash when vLLM's kv_cache_utils is not importable.
NONE_HASH = 0


def _chunk_key(prev: int, chunk: Sequence[int]) -> int:
    return hash((prev, tuple(chunk), ()))


def chunk_spans(
    tokens: Sequence[int], chunk_size: int = CHUNK_SIZE, *, partial: bool = False
) -> list[tuple[int, int]]:
    """`(end_offset, key)` per chunk, in order.

    With `partial=True` a trailing chunk shorter than `chunk_size` is included
    (its end is `len(tokens)`), as the controller's lookup does.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    n = len(tokens)
    end = n if partial else n - n % chunk_size
    spans: list[tuple[int, int]] = []
    key = NONE_HASH
    for start in range(0, end, chunk_size):
        chunk = tokens[start : start + chunk_size]
        key = _chunk_key(key, chunk)
        spans.append((min(start + chunk_size, n), key))
    return spans


def chunk_keys(tokens: Sequence[int], chunk_size: int = CHUNK_SIZE) -> list[int]:
    """One key per FULL chunk, exactly as LMCache computes them:
    key_i = hash((key_{i-1}, tuple(chunk_i), ())) with key_{-1} = 0 (CPython tuple hash of ints).
    """
    return [key for _, key in chunk_spans(tokens, chunk_size)]
