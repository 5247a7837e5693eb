"""Fixed-size summaries: a log-bucketed histogram for percentiles and a heavy-hitters table.

Both stay bounded however many lines are read: the histogram has at most ~400
buckets (5% wide, 1 µs to a day), the heavy-hitters table at most `2 * capacity` keys.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sized

_BASE = math.log(1.05)
_MIN = 1e-3  # ms: values below share bucket 0


class LogHistogram:
    """Percentiles within 5% relative error in constant memory."""

    __slots__ = ("counts", "n")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0

    def add(self, value: float) -> None:
        idx = 0 if value <= _MIN else int(math.log(value / _MIN) / _BASE) + 1
        self.counts[idx] = self.counts.get(idx, 0) + 1
        self.n += 1

    def merge(self, other: LogHistogram) -> None:
        for idx, count in other.counts.items():
            self.counts[idx] = self.counts.get(idx, 0) + count
        self.n += other.n

    def quantile(self, q: float) -> float | None:
        """The value at quantile `q` (0..1): the geometric middle of its bucket."""
        if not self.n:
            return None
        rank = q * (self.n - 1)
        seen = 0
        for idx in sorted(self.counts):
            seen += self.counts[idx]
            if seen > rank:
                return 0.0 if idx == 0 else _MIN * math.exp((idx - 0.5) * _BASE)
        return None  # unreachable: counts sum to n


class HeavyHitters:
    """Approximate top-k counts of an unbounded key stream (lossy counting).

    Exact while at most `2 * capacity` distinct keys were seen; after that the table
    is pruned to its `capacity` largest counts whenever it doubles, so a key's count
    may be an undercount (never an overcount). `exact` says which case holds."""

    def __init__(self, capacity: int = 1000) -> None:
        self.capacity = capacity
        self.counts: dict[str, int] = {}
        self.exact = True

    def add(self, key: str, count: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + count
        if len(self.counts) > 2 * self.capacity:
            kept = sorted(self.counts.items(), key=lambda kv: -kv[1])[: self.capacity]
            self.counts = dict(kept)
            self.exact = False

    def top(self, k: int) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def capped_key(table: Sized | Container[str], key: str, limit: int) -> str:
    """`key`, or "(other)" once `table` already holds `limit` distinct keys and not `key`."""
    return key if key in table or len(table) < limit else "(other)"  # type: ignore[operator, arg-type]
