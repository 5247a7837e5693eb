"""Fold access-log records into time buckets and fixed-size breakdowns.

Memory is bounded whatever the log's length: at most `max_buckets` time buckets
(their width doubles, merging neighbours, when the log spans more), each holding
counters and two `LogHistogram`s; breakdown tables are capped (extra keys fold
into "(other)"); prefixes go through a `HeavyHitters` table.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kvreport.sketch import HeavyHitters, LogHistogram, capped_key

TOKEN_FIELDS = ("prompt_tokens", "cached_tokens", "completion_tokens", "predicted_cached_tokens")
MAX_KEYS = 200  # per breakdown table
_NUMBERS = re.compile(r"'[^']*'|\"[^\"]*\"|\d+")


@dataclass
class Stats:
    """Counters shared by a time bucket and a breakdown row."""

    requests: int = 0
    errors: int = 0
    retries: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_FIELDS, 0))
    latency: LogHistogram = field(default_factory=LogHistogram)
    ttft: LogHistogram = field(default_factory=LogHistogram)

    def add(self, r: dict[str, Any], failed: bool) -> None:
        self.requests += 1
        self.errors += failed
        self.retries += _int(r.get("retries"))
        for name in TOKEN_FIELDS:
            self.tokens[name] += _int(r.get(name))
        latency, ttft = r.get("latency_ms"), r.get("ttfb_ms")
        if isinstance(latency, int | float):
            self.latency.add(latency)
        if isinstance(ttft, int | float):
            self.ttft.add(ttft)

    def merge(self, other: Stats) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.retries += other.retries
        for name in TOKEN_FIELDS:
            self.tokens[name] += other.tokens[name]
        self.latency.merge(other.latency)
        self.ttft.merge(other.ttft)


@dataclass
class Bucket(Stats):
    status: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)
    tiers: Counter[str] = field(default_factory=Counter)
    silent_misses: int = 0
    failovers: int = 0
    breaker: int = 0

    def merge(self, other: Stats) -> None:
        super().merge(other)
        assert isinstance(other, Bucket)
        for name in ("status", "decisions", "tiers"):
            getattr(self, name).update(getattr(other, name))
        self.silent_misses += other.silent_misses
        self.failovers += other.failovers
        self.breaker += other.breaker


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def error_kind(error: str) -> str:
    """The error text without quoted values and numbers: a bounded set of kinds."""
    return _NUMBERS.sub("…", error.split(":", 1)[0]).strip()[:80] or "(empty)"


def is_silent_miss(r: dict[str, Any]) -> bool:
    """The cache was predicted to hold at least 16 tokens, the backend reported under half of them."""
    predicted, actual = r.get("predicted_cached_tokens"), r.get("cached_tokens")
    return (isinstance(predicted, int) and predicted >= 16 and isinstance(actual, int)
            and actual < predicted / 2)


class Aggregator:
    def __init__(self, max_buckets: int = 600, top_prefixes: int = 1000) -> None:
        """Buckets start at 1/8 s (a short test run still draws a curve) and double as the log's span grows."""
        self.max_buckets = max_buckets
        self.width = 0.125  # seconds per bucket (a power of two, so doubling keeps edges); doubles as needed
        self.buckets: dict[int, Bucket] = {}
        self.total = Bucket()
        self.untimed = 0
        self.first: float | None = None
        self.last: float | None = None
        self.by_endpoint_model: dict[tuple[str, str], Stats] = {}
        self.by_route: dict[str, Stats] = {}
        self.error_kinds: Counter[str] = Counter()
        self.prefixes = HeavyHitters(top_prefixes)
        self._second: tuple[str, float] = ("", 0.0)

    def epoch(self, stamp: Any) -> float | None:
        """Seconds since the epoch of an access-log time (`2026-12-02T13:03:21.432Z`, or a number)."""
        if isinstance(stamp, int | float) and not isinstance(stamp, bool):
            return float(stamp)
        if not isinstance(stamp, str) or len(stamp) < 19:
            return None
        head = stamp[:19]
        if head != self._second[0]:
            try:
                self._second = (head, datetime.fromisoformat(head + "+00:00").timestamp())
            except ValueError:
                return None
        frac = stamp[19:].rstrip("Z")
        try:
            return self._second[1] + (float(frac) if frac.startswith(".") else 0.0)
        except ValueError:
            return self._second[1]

    def add(self, r: dict[str, Any]) -> None:
        status = r.get("status")
        error = r.get("error")
        failed = bool(error) or (isinstance(status, int) and status >= 500)
        bucket = self._bucket(self.epoch(r.get("time")))
        for target in (self.total, bucket):
            if target is None:
                continue
            target.add(r, failed)
            target.status[str(status)] += 1
            decision = str(r.get("decision") or "-")
            target.decisions[capped_key(target.decisions, decision, MAX_KEYS)] += 1
            target.tiers[capped_key(target.tiers, str(r.get("tier") or "-"), MAX_KEYS)] += 1
            target.silent_misses += is_silent_miss(r)
            target.failovers += decision.startswith("failover")
            target.breaker += "breaker" in f"{error or ''} {r.get('decision_reason') or ''}".lower()
        key = (str(r.get("endpoint") or "-"), str(r.get("model") or "-"))
        if key not in self.by_endpoint_model and len(self.by_endpoint_model) >= MAX_KEYS:
            key = ("(other)", "(other)")
        self.by_endpoint_model.setdefault(key, Stats()).add(r, failed)
        route = capped_key(self.by_route, str(r.get("route") or r.get("path") or "-"), MAX_KEYS)
        self.by_route.setdefault(route, Stats()).add(r, failed)
        if error:
            self.error_kinds[capped_key(self.error_kinds, error_kind(str(error)), MAX_KEYS)] += 1
        if r.get("prompt_hash"):
            self.prefixes.add(str(r["prompt_hash"]))

    def _bucket(self, ts: float | None) -> Bucket | None:
        if ts is None:
            self.untimed += 1
            return None
        self.first = ts if self.first is None else min(self.first, ts)
        self.last = ts if self.last is None else max(self.last, ts)
        key = int(ts // self.width)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = Bucket()
            while self._span() > self.max_buckets:
                self._coarsen()
                bucket = self.buckets[int(ts // self.width)]
        return bucket

    def _span(self) -> int:
        assert self.first is not None and self.last is not None
        return int(self.last // self.width) - int(self.first // self.width) + 1

    def _coarsen(self) -> None:
        self.width *= 2
        merged: dict[int, Bucket] = {}
        for key, bucket in self.buckets.items():
            target = merged.get(key // 2)
            if target is None:
                merged[key // 2] = bucket
            else:
                target.merge(bucket)
        self.buckets = merged

    def series(self) -> list[tuple[float, Bucket]]:
        """(bucket start, bucket) for every bucket from first to last, empty ones included."""
        if not self.buckets:
            return []
        lo, hi = min(self.buckets), max(self.buckets)
        return [(k * self.width, self.buckets.get(k) or Bucket()) for k in range(lo, hi + 1)]
