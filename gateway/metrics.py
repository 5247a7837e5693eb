"""The gateway's own Prometheus metrics (one registry per app; filters add theirs to it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.endpoints import ClusterRegistry
from gateway.pickers.base import Picker
from gateway.recent import RecentRequests
from kvkernel.breaker import BreakerState
from kvkernel.context import RequestContext

M = TypeVar("M", Counter, Gauge, Histogram)
_BREAKER_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    recent: RecentRequests = field(default_factory=RecentRequests)  # the live /dashboard's requests

    def __post_init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = Counter("kvgate_requests", "Requests answered", ["cluster", "endpoint", "status"], registry=r)
        self.latency = Histogram("kvgate_request_latency_seconds", "Request latency", ["cluster"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.ttfb = Histogram("kvgate_time_to_first_byte_seconds", "Time to first byte", ["cluster"], registry=r,
                              buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.retries = Counter("kvgate_upstream_retries", "Attempts beyond the first", ["cluster"], registry=r)
        self.inflight = Gauge("kvgate_endpoint_inflight", "In-flight requests", ["endpoint"], registry=r)
        self.healthy = Gauge("kvgate_endpoint_healthy", "1 if the endpoint passes health checks",
                             ["endpoint"], registry=r)
        self.breaker = Gauge("kvgate_endpoint_breaker_state", "0 closed, 1 half-open, 2 open",
                             ["endpoint"], registry=r)
        self.picker_learned = Gauge("kvgate_picker_learned", "What a picker learned per endpoint (see `name`): "
                                    "prefill_rate_tokens_per_second, overhead_seconds, queue_seconds, "
                                    "ttft_abs_error_seconds", ["cluster", "endpoint", "name"], registry=r)
        self.background_dropped = Gauge("kvgate_background_dropped", "Background jobs dropped (queue full)",
                                        registry=r)

    def child(self, metric: M, *labels: str) -> M:
        """`metric.labels(*labels)`, remembered: the hot path skips prometheus' label lookup.
        Label sets are bounded (clusters x endpoints x statuses)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe(self, ctx: RequestContext) -> None:
        """Count one finished request (and keep its summary for the dashboard)."""
        self.recent.add(ctx)
        cluster = ctx.cluster or "-"
        self.child(self.requests, cluster, ctx.endpoint or "-", str(ctx.status or 0)).inc()
        if ctx.latency_ms is not None:
            self.child(self.latency, cluster).observe(ctx.latency_ms / 1000)
        if ctx.ttfb_ms is not None:
            self.child(self.ttfb, cluster).observe(ctx.ttfb_ms / 1000)
        if ctx.retries:
            self.child(self.retries, cluster).inc(ctx.retries)

    def refresh_pickers(self, pickers: Mapping[str, Picker]) -> None:
        for cluster, picker in pickers.items():
            for endpoint, name, value in picker.gauges():
                self.picker_learned.labels(cluster, endpoint, name).set(value)

    def refresh_endpoints(self, clusters: ClusterRegistry) -> None:
        """Copy live endpoint state into gauges (called when /metrics is scraped)."""
        for ep in clusters.all_endpoints():
            self.inflight.labels(ep.id).set(ep.inflight)
            self.healthy.labels(ep.id).set(1 if ep.healthy else 0)
            self.breaker.labels(ep.id).set(_BREAKER_VALUE[ep.breaker.state])
