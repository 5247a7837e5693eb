"""Deterministic tie-break for the `cache_aware` picker, so that replicas agree without talking.

Several gateway replicas see the same engines' KV events but not each other's
in-flight requests. When no candidate holds a request's new prefix, the scores
of the candidates are close and each replica's small differences (its own queue
view, its learned rates, a rotating turn) would place the same new prefix on
different engines, which then each prefill it. Instead, among the candidates
whose score is within a small tolerance of the best, the one with the highest
rendezvous weight for the prompt's *placement key* wins: every replica computes
the same weights, so they place a new prefix on the same engine, and only the
prefix's candidates' relative load (beyond the tolerance) moves it.

The placement key is the block key of the first block no candidate holds (the
request's new part), or of the last block when some candidate holds all of it:
requests that share a prefix beyond what the engines hold share that key, and
requests that only share a common head (a chat template, a shared system
prompt already cached) do not, so they still spread. Pure: no I/O, table-tested.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def placement_key(keys: Sequence[int] | None, best_reuse_tokens: int, block_size: int) -> int | None:
    """The key of the first block beyond `best_reuse_tokens` (the last one if none is beyond);
    None without keys (a prompt shorter than a block, or no tokens)."""
    if not keys:
        return None
    return keys[min(len(keys) - 1, max(0, best_reuse_tokens) // block_size)]


def rendezvous_weight(key: int, endpoint_id: str) -> bytes:
    """The same on every replica and across restarts (no PYTHONHASHSEED dependence)."""
    return hashlib.blake2b(key.to_bytes(8, "big", signed=True) + endpoint_id.encode(), digest_size=8).digest()


def near_best(scores: Sequence[float], relative: float, absolute: float) -> list[int]:
    """Indices of the scores within `max(absolute, relative * best)` of the best (lowest) one."""
    top = min(scores)
    bound = top + max(absolute, relative * top)
    return [i for i, s in enumerate(scores) if s <= bound]


def rendezvous_pick(items: Sequence[T], key: int, endpoint_id: Callable[[T], str]) -> T:
    """The item whose endpoint id has the highest rendezvous weight for `key`."""
    return max(items, key=lambda item: rendezvous_weight(key, endpoint_id(item)))
