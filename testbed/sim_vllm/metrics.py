"""Prometheus text exposition of the engine's state under vLLM's metric names."""

from __future__ import annotations

from testbed.sim_vllm.engine import Engine, Histogram


def _labels(model: str, **extra: str) -> str:
    pairs = {"engine": "0", "model_name": model, **extra}
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs.items()) + "}"


def _metric(lines: list[str], name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
    lines.append(f"# HELP {name} {help_}")
    lines.append(f"# TYPE {name} {kind}")
    lines.extend(f"{name}{labels} {value!r}" if isinstance(value, float) else f"{name}{labels} {value}"
                 for labels, value in samples)


def _histogram(lines: list[str], name: str, help_: str, hist: Histogram, model: str) -> None:
    lines.append(f"# HELP {name} {help_}")
    lines.append(f"# TYPE {name} histogram")
    cumulative = 0
    for bound, count in zip(hist.bounds, hist.counts, strict=True):
        cumulative += count
        lines.append(f"{name}_bucket{_labels(model, le=repr(float(bound)))} {cumulative}")
    lines.append(f"{name}_bucket{_labels(model, le='+Inf')} {hist.n}")
    lines.append(f"{name}_count{_labels(model)} {hist.n}")
    lines.append(f"{name}_sum{_labels(model)} {hist.total!r}")


def render(engine: Engine, model: str) -> str:
    """The /metrics body (text format 0.0.4)."""
    s, labels = engine.stats, _labels(model)
    cache = engine.cache.stats()
    lines: list[str] = []
    _metric(lines, "vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
            [(labels, s.running)])
    _metric(lines, "vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
            [(labels, s.waiting)])
    _metric(lines, "vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
            [(labels, float(engine.kv_cache_usage()))])
    _metric(lines, "vllm:prefix_cache_queries_total", "counter",
            "Prefix cache queries, in terms of number of queried tokens.", [(labels, s.prefix_queries)])
    _metric(lines, "vllm:prefix_cache_hits_total", "counter",
            "Prefix cache hits, in terms of number of cached tokens.", [(labels, s.prefix_hits)])
    _metric(lines, "vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
            [(labels, s.prompt_tokens)])
    _metric(lines, "vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
            [(labels, s.generation_tokens)])
    _metric(lines, "vllm:request_success_total", "counter", "Count of successfully processed requests.",
            [(_labels(model, finished_reason=reason), n) for reason, n in sorted(s.finished.items())])
    _histogram(lines, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
               s.ttft, model)
    _histogram(lines, "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
               s.e2e, model)
    _metric(lines, "sim_vllm:cache_blocks", "gauge", "Blocks in the simulated prefix cache, by state.",
            [(_labels(model, state=k.removesuffix("_blocks") if k != "blocks" else "cached"), v)
             for k, v in cache.items() if k.endswith("blocks")])
    _metric(lines, "sim_vllm:cache_evictions_total", "counter", "Blocks evicted from the simulated prefix cache.",
            [(labels, cache["evictions"])])
    return "\n".join(lines) + "\n"
