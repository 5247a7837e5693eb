"""Prometheus metrics of the kvcache filter and cache management (on the app's registry).

- `kvgate_kvcache_decisions_total{tier,reason}`: which tier produced the hints and why
  (e.g. tier "local-index", reason "lmcache_timeout");
- `kvgate_routing_decisions_total{decision}`: the picker's decision ("cache_hit", "balance", ...);
- `kvgate_kvcache_lookup_seconds{outcome}`: LMCache `/lookup` latency by outcome
  (hit, miss, timeout, unavailable, breaker_open, error);
- `kvgate_lmcache_breaker_state{calls}`: 0 closed, 1 half-open, 2 open, for the
  request path (`lookup`) and for background actions (`actions`);
- `kvgate_cache_actions_total{kind,outcome}`: background pin/compress/evict by outcome
  (ok, evicted, cleared, already_cleared, skipped, failed, dropped).
Without a registry (unit tests) every method is a no-op.
"""

from __future__ import annotations

import weakref
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvkernel.breaker import BreakerState
from kvkernel.metric_children import Children

_BREAKER_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
_LOOKUP_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0)
_SHARED: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Any]] = weakref.WeakKeyDictionary()


def _collectors(registry: CollectorRegistry) -> dict[str, Any]:
    """One set of collectors per registry (two kvcache filters in one app share them)."""
    found = _SHARED.get(registry)
    if found is None:
        r = registry
        found = _SHARED[registry] = {
            "decisions": Counter("kvgate_kvcache_decisions", "Cache-hint tier decisions", ["tier", "reason"],
                                 registry=r),
            "routing": Counter("kvgate_routing_decisions", "Endpoint choices by decision", ["decision"],
                               registry=r),
            "lookup": Histogram("kvgate_kvcache_lookup_seconds", "LMCache /lookup latency", ["outcome"],
                                registry=r, buckets=_LOOKUP_BUCKETS),
            "breaker": Gauge("kvgate_lmcache_breaker_state", "LMCache breaker: 0 closed, 1 half-open, 2 open",
                             ["calls"], registry=r, multiprocess_mode="livemax"),
            "actions": Counter("kvgate_cache_actions", "Background cache actions", ["kind", "outcome"],
                               registry=r),
        }
    return found


class KVCacheMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self._c = _collectors(registry) if registry is not None else None
        # Counted on every request: their children are looked up once per label values.
        self._decisions = Children(self._c["decisions"]) if self._c is not None else None
        self._routing = Children(self._c["routing"]) if self._c is not None else None

    def decision(self, tier: str, reason: str, decision: str | None) -> None:
        if self._decisions is not None and self._routing is not None:
            self._decisions(tier, reason).inc()
            self._routing(decision or "-").inc()

    def lookup(self, outcome: str, seconds: float) -> None:
        if self._c is not None:
            self._c["lookup"].labels(outcome).observe(seconds)

    def breaker_state(self, state: BreakerState, calls: str = "lookup") -> None:
        """`calls`: "lookup" (the request path) or "actions" (background pin/compress/evict)."""
        if self._c is not None:
            self._c["breaker"].labels(calls).set(_BREAKER_VALUE[state])

    def action(self, kind: str, outcome: str) -> None:
        if self._c is not None:
            self._c["actions"].labels(kind, outcome).inc()
