"""The gateway's own Prometheus metrics (one registry per app; filters add theirs to it).

With `server.workers > 1`, `kvgate serve` switches prometheus-client to its multiprocess
mode before the workers fork (`enable_multiprocess`): every worker writes its values to
files in one fresh directory and a scrape, whichever worker answers it, merges them all
(`render`). Counters and histograms sum over workers (dead ones included, so totals
never go back); each gauge declares how workers combine (`multiprocess_mode`):
in-flight requests and dropped jobs add up over live workers, an endpoint is healthy
only if every live worker sees it healthy, and a breaker shows its worst state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.endpoints import ClusterRegistry
from gateway.loop_lag import LoopLag
from gateway.pickers.base import Picker
from gateway.recent import RecentRequests
from kvkernel.breaker import BreakerState
from kvkernel.context import RequestContext

M = TypeVar("M", Counter, Gauge, Histogram)
_BREAKER_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable_multiprocess(path: str) -> None:
    """Metrics created from now on (in this process and the ones it forks) live in files
    under `path`; call before any metric exists and before forking."""
    os.environ[MULTIPROC_ENV] = path
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call] # read at import otherwise


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def render(registry: CollectorRegistry) -> bytes:
    """The exposition text: this registry's, or in multiprocess mode every worker's merged."""
    path = multiprocess_dir()
    if path is None:
        return generate_latest(registry)
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path)  # type: ignore[no-untyped-call]
    return generate_latest(merged)


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    recent: RecentRequests = field(default_factory=RecentRequests)  # the live /dashboard's requests

    def __post_init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._answers: dict[tuple[str, str, int], _AnswerSeries] = {}
        r = self.registry
        self.requests = Counter("kvgate_requests", "Requests answered", ["cluster", "endpoint", "status"], registry=r)
        self.latency = Histogram("kvgate_request_latency_seconds", "Request latency", ["cluster"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.ttfb = Histogram("kvgate_time_to_first_byte_seconds", "Time to first byte", ["cluster"], registry=r,
                              buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        tokens = ["cluster", "endpoint", "model"]
        self.prompt_tokens = Counter("kvgate_prompt_tokens", "Prompt tokens the backends reported", tokens,
                                     registry=r)
        self.cached_tokens = Counter("kvgate_cached_tokens", "Prompt tokens served from the backends' prefix cache",
                                     tokens, registry=r)
        self.completion_tokens = Counter("kvgate_completion_tokens", "Completion tokens the backends reported",
                                         tokens, registry=r)
        self.ttft = Histogram("kvgate_time_to_first_token_seconds", "Time to first token (streams)",
                              ["cluster", "model"], registry=r,
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.tpot = Histogram("kvgate_time_per_output_token_seconds", "Time per output token after the first "
                              "(streams)", ["cluster", "model"], registry=r,
                              buckets=(.001, .0025, .005, .01, .02, .04, .06, .08, .1, .15, .2, .3, .5, 1))
        self.retries = Counter("kvgate_upstream_retries", "Attempts beyond the first", ["cluster"], registry=r)
        self.inflight = Gauge("kvgate_endpoint_inflight", "In-flight requests", ["endpoint"], registry=r,
                              multiprocess_mode="livesum")
        self.healthy = Gauge("kvgate_endpoint_healthy", "1 if the endpoint passes health checks",
                             ["endpoint"], registry=r, multiprocess_mode="livemin")
        self.breaker = Gauge("kvgate_endpoint_breaker_state", "0 closed, 1 half-open, 2 open",
                             ["endpoint"], registry=r, multiprocess_mode="livemax")
        self.ejected = Gauge("kvgate_endpoint_ejected", "1 while outlier detection ejects the endpoint",
                             ["endpoint"], registry=r, multiprocess_mode="livemax")
        self.ejections = Counter("kvgate_endpoint_ejections", "Outlier ejections of the endpoint",
                                 ["endpoint"], registry=r)
        self._ejections_seen: dict[str, int] = {}
        self.admission_queued = Gauge("kvgate_admission_queued", "Requests waiting for an in-flight slot",
                                      registry=r, multiprocess_mode="livesum")
        self.admission_rejected = Gauge("kvgate_admission_rejected", "Requests refused by admission control "
                                        "(queue full or queue_timeout) since start", registry=r,
                                        multiprocess_mode="livesum")
        # Each worker learns on its own traffic: one series per worker (a `pid` label).
        self.picker_learned = Gauge("kvgate_picker_learned", "What a picker learned per endpoint (see `name`): "
                                    "prefill_rate_tokens_per_second, overhead_seconds, queue_seconds, "
                                    "ttft_abs_error_seconds", ["cluster", "endpoint", "name"], registry=r,
                                    multiprocess_mode="liveall")
        self.loop_lag = Gauge("kvgate_event_loop_lag_seconds", "How late the event loop ran a 100 ms wake-up, "
                              "last sample", registry=r, multiprocess_mode="livemax")
        self.discovery_changes = Counter("kvgate_discovery_changes", "Changes of a cluster's discovered endpoint "
                                         "set applied (a new config generation each)", ["cluster"], registry=r)
        self.discovery_errors = Counter("kvgate_discovery_errors", "Failed discovery rounds (resolver failure, "
                                        "unreadable or invalid file): the last known endpoints stay", ["cluster"],
                                        registry=r)
        self.discovered_endpoints = Gauge("kvgate_discovery_endpoints", "Endpoints the cluster's discovery lists "
                                          "now", ["cluster"], registry=r, multiprocess_mode="livemax")
        self._learned_labels: set[tuple[str, str, str]] = set()
        self.background_dropped = Gauge("kvgate_background_dropped", "Background jobs dropped (queue full)",
                                        registry=r, multiprocess_mode="livesum")

    def child(self, metric: M, *labels: str) -> M:
        """`metric.labels(*labels)`, remembered: the hot path skips prometheus' label lookup.
        Label sets are bounded (clusters x endpoints x statuses)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe(self, ctx: RequestContext) -> None:
        """Count one finished request (and keep its summary for the dashboard). The series
        of one (cluster, endpoint, status) are found with one lookup; a series is created
        only once something is observed in it."""
        self.recent.add(ctx)
        cluster, endpoint, status = ctx.cluster or "-", ctx.endpoint or "-", ctx.status or 0
        series = self._answers.get((cluster, endpoint, status))
        if series is None:
            series = self._answers[(cluster, endpoint, status)] = _AnswerSeries(self, cluster, endpoint, status)
        series.requests.inc()
        if ctx.latency_ms is not None:
            series.latency.observe(ctx.latency_ms / 1000)
        if ctx.ttfb_ms is not None:
            series.ttfb().observe(ctx.ttfb_ms / 1000)
        if ctx.attempts > 1:
            self.child(self.retries, cluster).inc(ctx.attempts - 1)
        if status == 200:
            self.observe_tokens(ctx, cluster)

    def observe_tokens(self, ctx: RequestContext, cluster: str) -> None:
        """Token counters, TTFT and time per output token of a successful request. The model
        label is the one the client asked for: a backend accepted it, so the set is bounded."""
        usage, model = ctx.usage, ctx.model or "-"
        labels = (cluster, ctx.endpoint or "-", model)
        for metric, value in ((self.prompt_tokens, usage.prompt_tokens), (self.cached_tokens, usage.cached_tokens),
                              (self.completion_tokens, usage.completion_tokens)):
            if value:
                self.child(metric, *labels).inc(value)
        if not ctx.stream or ctx.ttfb_ms is None:
            return
        self.child(self.ttft, cluster, model).observe(ctx.ttfb_ms / 1000)
        done = usage.completion_tokens
        if done is not None and done > 1 and ctx.latency_ms is not None:
            self.child(self.tpot, cluster, model).observe((ctx.latency_ms - ctx.ttfb_ms) / 1000 / (done - 1))

    def refresh_loop_lag(self, lag: LoopLag) -> None:
        self.loop_lag.set(lag.samples[-1] if lag.samples else 0.0)

    def refresh_pickers(self, pickers: Mapping[str, Picker]) -> None:
        """Set what the pickers report; series they no longer report (an endpoint that
        left, a cluster that went) are removed."""
        seen: set[tuple[str, str, str]] = set()
        for cluster, picker in pickers.items():
            for endpoint, name, value in picker.gauges():
                self.picker_learned.labels(cluster, endpoint, name).set(value)
                seen.add((cluster, endpoint, name))
        for labels in self._learned_labels - seen:
            self.picker_learned.remove(*labels)
        self._learned_labels = seen

    def forget_endpoint(self, endpoint: str) -> None:
        """The endpoint left the fleet: its live gauges go (its counters stay, as counters do)."""
        for gauge in (self.inflight, self.healthy, self.breaker, self.ejected):
            try:
                gauge.remove(endpoint)
            except KeyError:  # never scraped while it served
                pass
        self._ejections_seen.pop(endpoint, None)

    def refresh_endpoints(self, clusters: ClusterRegistry) -> None:
        """Copy live endpoint state into gauges (called when /metrics is scraped)."""
        for ep in clusters.all_endpoints():
            self.inflight.labels(ep.id).set(ep.inflight)
            self.healthy.labels(ep.id).set(1 if ep.healthy else 0)
            self.breaker.labels(ep.id).set(_BREAKER_VALUE[ep.breaker.state])
            self.ejected.labels(ep.id).set(1 if ep.outlier.ejected() else 0)
            seen = self._ejections_seen.get(ep.id, 0)  # a rebuilt endpoint (same id) counts from 0 again
            self.ejections.labels(ep.id).inc(max(0, ep.outlier.ejections - seen))
            self._ejections_seen[ep.id] = ep.outlier.ejections


class _AnswerSeries:
    """The request counter and latency histograms of one (cluster, endpoint, status)."""

    __slots__ = ("requests", "latency", "_metrics", "_cluster", "_ttfb")

    def __init__(self, metrics: GatewayMetrics, cluster: str, endpoint: str, status: int) -> None:
        self.requests = metrics.child(metrics.requests, cluster, endpoint, str(status))
        self.latency = metrics.child(metrics.latency, cluster)
        self._metrics, self._cluster = metrics, cluster
        self._ttfb: Histogram | None = None

    def ttfb(self) -> Histogram:
        """Created on first use: a cluster whose answers never had a body has no series."""
        if self._ttfb is None:
            self._ttfb = self._metrics.child(self._metrics.ttfb, self._cluster)
        return self._ttfb
