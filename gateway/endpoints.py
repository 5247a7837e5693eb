"""Upstream endpoints and clusters: live state the proxy, picker and filters read."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

from gateway.config import ClusterConfig, EndpointConfig
from gateway.outlier import OutlierState, OutlierTracker
from kvkernel.breaker import BreakerState, CircuitBreaker


@dataclass(slots=True)
class BackendLoad:
    """Load figures scraped from the backend's /metrics (None until first scrape)."""

    num_requests_running: float | None = None
    num_requests_waiting: float | None = None
    kv_cache_usage: float | None = None
    scraped_at: float | None = None


@dataclass(slots=True)
class EndpointStats:
    requests: int = 0
    failures: int = 0
    health_ejections: int = 0  # times failed health checks took it out


class Endpoint:
    """One upstream server. `eligible()` = healthy, not draining (it left the fleet and only
    finishes its in-flight requests), not ejected as an outlier, below its in-flight cap, and
    its breaker admits calls. `healthy=False`: unproven until a health check passes (a
    discovered endpoint); else optimistic until the first check says otherwise."""

    def __init__(self, config: EndpointConfig, breaker: CircuitBreaker, max_inflight: int | None = None,
                 healthy: bool = True) -> None:
        self.config = config
        self.id = config.id
        self.url = config.base_url
        self.kind: str = config.kind
        self.lmcache_instance_id = config.lmcache_instance_id or config.id
        self.has_event_feed = config.kv_events is not None  # the engine publishes KV events
        self.breaker = breaker
        self.healthy = healthy
        self.draining = False
        self.inflight = 0
        self.prefill_backlog = 0  # predicted uncached prompt tokens of in-flight requests
        self.load = BackendLoad()
        self.stats = EndpointStats()
        self.health_changed_at = time.monotonic()
        self.outlier = OutlierState()
        self.max_inflight = max_inflight

    @property
    def kv_cache_usage(self) -> float | None:
        return self.load.kv_cache_usage

    @property
    def num_requests_waiting(self) -> int | None:
        waiting = self.load.num_requests_waiting
        return int(waiting) if waiting is not None else None

    def eligible(self) -> bool:
        return (self.healthy and not self.draining and not self.outlier.ejected() and self.breaker.available()
                and (self.max_inflight is None or self.inflight < self.max_inflight))

    def set_healthy(self, healthy: bool) -> None:
        if healthy != self.healthy:
            self.healthy = healthy
            self.health_changed_at = time.monotonic()
            if not healthy:
                self.stats.health_ejections += 1

    def snapshot(self) -> dict[str, object]:
        return {
            "id": self.id, "url": self.url, "kind": self.kind, "healthy": self.healthy,
            "breaker": self.breaker.state.value, "inflight": self.inflight,
            "prefill_backlog": self.prefill_backlog, "requests": self.stats.requests,
            "failures": self.stats.failures, "health_ejections": self.stats.health_ejections,
            "ejections": self.outlier.ejections, "ejected_until": self._ejected_until(),
            "num_requests_waiting": self.load.num_requests_waiting, "kv_cache_usage": self.load.kv_cache_usage,
        }

    def _ejected_until(self) -> float | None:
        """Wall-clock (Unix) time the outlier ejection ends, None when not ejected."""
        remaining = self.outlier.remaining()
        return round(time.time() + remaining, 3) if remaining is not None else None


@dataclass(slots=True)
class Cluster:
    config: ClusterConfig
    endpoints: list[Endpoint] = field(default_factory=list)
    outliers: OutlierTracker | None = None

    def __post_init__(self) -> None:
        if self.outliers is None:
            self.outliers = OutlierTracker(self.config.outlier_detection, [e.outlier for e in self.endpoints])

    @property
    def name(self) -> str:
        return self.config.name

    def endpoint(self, endpoint_id: str) -> Endpoint | None:
        return next((e for e in self.endpoints if e.id == endpoint_id), None)


def build_endpoint(config: ClusterConfig, endpoint: EndpointConfig, healthy: bool = True) -> Endpoint:
    return Endpoint(endpoint, config.circuit_breaker.build(f"endpoint:{endpoint.id}"), config.max_inflight_per_endpoint,
                    healthy)


def build_cluster(config: ClusterConfig, unproven: Collection[str] = ()) -> Cluster:
    """The cluster's endpoints, new; those named in `unproven` start unhealthy (see `Endpoint`)."""
    return Cluster(config, [build_endpoint(config, ep, ep.id not in unproven) for ep in config.endpoints])


class ClusterRegistry:
    """All clusters by name; implements filters.base.ClusterDirectory."""

    def __init__(self, clusters: Sequence[Cluster]) -> None:
        self._clusters = {c.name: c for c in clusters}

    def __getitem__(self, name: str) -> Cluster:
        return self._clusters[name]

    def __iter__(self) -> Iterator[Cluster]:
        return iter(self._clusters.values())

    def endpoints(self, cluster: str) -> Sequence[Endpoint]:
        found = self._clusters.get(cluster)
        return found.endpoints if found else []

    def cluster_names(self) -> Sequence[str]:
        return list(self._clusters)

    def all_endpoints(self) -> list[Endpoint]:
        return [e for c in self._clusters.values() for e in c.endpoints]

    def breaker_states(self) -> dict[str, BreakerState]:
        return {e.id: e.breaker.state for e in self.all_endpoints()}
