"""Prometheus metrics of one daemon, under vLLM's names (one registry per daemon).

vLLM names the gateway and dashboards read: ``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc`` (a 0..1 fraction, as in
vLLM), ``vllm:prefix_cache_queries_total`` / ``vllm:prefix_cache_hits_total`` (in
tokens), ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
``vllm:time_to_first_token_seconds``, ``vllm:e2e_request_latency_seconds``,
``vllm:request_success_total{finished_reason}``. Daemon-specific ones start with
``mlxd_``. prometheus_client objects are thread-safe: the engine thread updates
them directly.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)


class DaemonMetrics:
    """All metrics of a daemon, labelled ``model_name``; gauges read live values lazily."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        reg, labels = self.registry, ["model_name"]
        self._model = model_name

        def counter(name: str, doc: str) -> Counter:
            made = Counter(name, doc, labels, registry=reg)
            made.labels(model_name)  # exported as 0 from the start, as vLLM does
            return made

        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of admitted requests")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens")
        self.rejected = counter("mlxd_requests_rejected", "Requests answered 429 because the queue was full")
        self._success = Counter("vllm:request_success", "Finished requests", labels + ["finished_reason"],
                                registry=reg)
        self._ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", labels,
                               buckets=TTFT_BUCKETS, registry=reg)
        self._ttft.labels(model_name)
        self._latency = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency",
                                  labels, buckets=LATENCY_BUCKETS, registry=reg)
        self._gauges: dict[str, Gauge] = {}

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """Register a gauge whose value is `read()` at scrape time."""
        gauge = Gauge(name, doc, ["model_name"], registry=self.registry)
        gauge.labels(self._model).set_function(read)
        self._gauges[name] = gauge

    def count(self, counter: Counter, amount: float = 1.0) -> None:
        if amount:
            counter.labels(self._model).inc(amount)

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.labels(self._model).observe(seconds)

    def observe_finished(self, reason: str, latency: float) -> None:
        self._success.labels(self._model, reason).inc()
        self._latency.labels(self._model).observe(latency)

    def render(self) -> bytes:
        """The prometheus text exposition format (version 0.0.4)."""
        return bytes(generate_latest(self.registry))
