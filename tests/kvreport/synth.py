"""Synthetic access-log lines with the gateway's fields (for tests and the 1M-line benchmark)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from typing import Any

ENDPOINTS = ("mlx-a", "mlx-b", "sim-1", "sim-2")
DECISIONS = ("cache_hit", "cache_hit", "cache_hit", "balance", "cache_hit_overridden_by_load",
             "no_hint_least_load", "failover:cache_aware")
TIERS = ("lmcache", "local-index", "none")


def records(n: int, seed: int = 0, start: float = 1_796_000_000.0, rate: float = 200.0) -> Iterator[dict[str, Any]]:
    """`n` access-log records, `rate` per second from `start`; a few with errors, retries, no body."""
    rng = random.Random(seed)
    for i in range(n):
        ts = start + i / rate
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
        endpoint = ENDPOINTS[i % 4]
        failed = i % 97 == 0
        prompt = rng.randint(50, 3000)
        predicted = rng.choice((0, prompt // 2, prompt - 16))
        yield {"time": stamp, "request_id": f"r{i}", "method": "POST", "path": "/v1/chat/completions",
               "route": "/v1/", "cluster": "llm", "model": ("tiny", "big")[i % 2],
               "prompt_hash": f"{rng.randint(0, 5000):016x}", "stream": i % 3 == 0, "endpoint": endpoint,
               "status": 502 if failed else 200, "bytes": 900, "latency_ms": round(rng.lognormvariate(4, 1), 3),
               "ttfb_ms": round(rng.lognormvariate(3, 1), 3), "retries": 1 if failed else 0,
               "error": f"upstream {endpoint} broke mid-response: ClientPayloadError" if failed else None,
               "decision": DECISIONS[i % len(DECISIONS)], "decision_reason": None, "tier": TIERS[i % 3],
               "preferred_endpoint": endpoint, "prompt_tokens_local": prompt,
               "predicted_cached_tokens": predicted, "matched_tokens": None, "lookup_ms": 0.4,
               "prompt_tokens": None if failed else prompt,
               "cached_tokens": None if failed else rng.choice((0, predicted)),
               "completion_tokens": None if failed else rng.randint(1, 64), "scores": None}


def lines(n: int, seed: int = 0) -> Iterator[str]:
    encode = json.JSONEncoder(separators=(",", ":")).encode
    for record in records(n, seed):
        yield encode(record) + "\n"
