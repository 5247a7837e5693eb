"""Output of `kvgate bench replicas`: per-workload tables, the same-run targets, JSON, what
the replicas' access logs say.

Target: with N > 1 replicas, hit ratio >= 0.95 x and TTFT p50 <= 1.05 x N = 1's (same
policy, same workload, same run).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvbench.replicas_variants import VARIANTS
from kvbench.report import machine_line, write_section
from kvbench.results import percentile
from kvbench.routing_targets import Target

if TYPE_CHECKING:
    from kvbench.replicas import Options, ReplicaResult

SECTION = "replicas"
TOLERANCE = 0.05
HEADER = ("| replicas | hit ratio | TTFT p50 | p90 | p99 (ms) | gateway TTFB p50 | engine TTFT mean (ms) "
          "| backend max / mean | errors | requests per replica | unforeseen hits | stale hints "
          "| learned rates (k tok/s) | decisions |")
COLUMNS = 14


def log_stats(paths: Sequence[Path]) -> dict[str, float]:
    """From the replicas' access logs: requests per replica; `unforeseen`: requests whose engine
    served at least a block more than the replica predicted (a prefix it did not know of:
    placed by another replica, events not yet arrived); `stale`: predicted at least a block
    more than the engine served (the prefix was evicted, or was still being prefilled)."""
    stats: dict[str, float] = {"unforeseen": 0, "stale": 0, "records": 0}
    ttfb = []
    for i, path in enumerate(paths):
        lines = path.read_text().splitlines() if path.exists() else []
        stats[f"replica_{i}"] = len(lines)
        for line in lines:
            record = json.loads(line)
            stats["records"] += 1
            if record.get("ttfb_ms") is not None:
                ttfb.append(float(record["ttfb_ms"]))
            predicted, cached = record.get("predicted_cached_tokens"), record.get("cached_tokens")
            if predicted is None or cached is None:
                continue
            stats["unforeseen"] += cached >= predicted + 16
            stats["stale"] += predicted >= cached + 16
    stats["gateway_ttfb_p50_ms"] = percentile(ttfb, 0.5)
    return stats


def _fmt(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0f}"


def _row(r: ReplicaResult) -> str:
    res = r.result
    label = res.label
    if res.skipped:
        return f"| {label} | skipped: {res.skipped} " + "|" * (COLUMNS - 1)
    s = res.summary()
    per_replica = " / ".join(str(int(r.log_stats.get(f"replica_{i}", 0))) for i in range(r.replicas))
    records = r.log_stats.get("records") or 1
    decisions = ", ".join(f"{k} {v}" for k, v in res.decisions.items()) or "-"
    return (f"| {label} | {s['hit_ratio']:.3f} | {_fmt(s['ttft_p50_ms'])} | {_fmt(s['ttft_p90_ms'])} "
            f"| {_fmt(s['ttft_p99_ms'])} | {_fmt(r.log_stats.get('gateway_ttfb_p50_ms', math.nan))} "
            f"| {_fmt(r.log_stats.get('engine_ttft_mean_ms', math.nan))} "
            f"| {s['backend_max']} / {s['backend_mean']:.1f} | {s['errors']} "
            f"| {per_replica} | {r.log_stats.get('unforeseen', 0) / records:.1%} "
            f"| {r.log_stats.get('stale', 0) / records:.1%} | {_rates(r.learned_rates)} | {decisions} |")


def _rates(per_replica: Sequence[dict[str, float]]) -> str:
    """Each replica's learned prefill rates, min-max over the endpoints, in thousands of tokens/s."""
    spans = [f"{min(r.values()) / 1000:.1f}-{max(r.values()) / 1000:.1f}" for r in per_replica if r]
    return " / ".join(spans) or "-"


def _policy(r: ReplicaResult) -> str:
    return r.result.policy.rsplit("@", 1)[0]


def targets(results: Sequence[ReplicaResult]) -> list[Target]:
    """Per workload, policy and N > 1: hit ratio and TTFT p50 against N = 1's."""
    found = []
    single = {(r.result.workload, _policy(r)): r.result.summary() for r in results
              if r.replicas == 1 and not r.result.skipped}
    for r in results:
        base = single.get((r.result.workload, _policy(r)))
        if r.replicas == 1 or base is None or r.result.skipped:
            continue
        s = r.result.summary()
        name = f"{r.result.workload}: {r.result.label}"
        if base["hit_ratio"]:
            found.append(Target(f"{name}, hit ratio / 1 replica's", s["hit_ratio"] / base["hit_ratio"],
                                1 - TOLERANCE, False))
        if base["ttft_p50_ms"]:
            found.append(Target(f"{name}, TTFT p50 / 1 replica's", s["ttft_p50_ms"] / base["ttft_p50_ms"],
                                1 + TOLERANCE, True))
    return found


def render(results: Sequence[ReplicaResult], opts: Options, command: str) -> str:
    shape = opts.shape
    fronts = sorted({r.front for r in results})
    lines = [
        f"`{command}`", "",
        f"{shape.backends} sim-vllm backends (KV {shape.capacity_blocks * 16} tokens each, prefill "
        f"{shape.prefill_rate:.0f} tok/s) publishing KV events, a mock LMCache, and N `kvgate serve` replicas "
        "(`cache_aware`, the same YAML, each subscribed to every engine's events, local tokenizer) behind a "
        f"round-robin front: **{', '.join(fronts)}** (N = 1 goes through it too). Everything fresh for every "
        f"(workload, N), the runs interleaved per workload; streamed requests, {opts.max_tokens} output tokens, "
        f"seed {opts.seed}, requests scale {opts.requests_scale}. Hit ratio = sum of `cached_tokens` / sum of "
        "`prompt_tokens`; TTFT on the client, through the front. Backend max / mean = requests per backend "
        "(the sims' counters). From the replicas' access logs: *unforeseen hits* = requests whose engine had "
        "at least a block more cached than the replica predicted (a prefix another replica placed there), "
        "*stale hints* = predicted at least a block more than the engine had. Gateway TTFB = the replicas' "
        "access-log `ttfb_ms` (request received -> first byte from the engine); engine TTFT = the sims' own "
        "`vllm:time_to_first_token_seconds` (queue + prefill at the engine). Learned rates = each replica's "
        "prefill rate per engine at the end (`/kvgate/status`), min-max over the engines (the sims run at "
        f"{shape.prefill_rate / 1000:g}k).",
    ]
    named = [(v, VARIANTS[v].what) for v in opts.variants if v in VARIANTS and len(opts.variants) > 1]
    if named:
        lines += ["", "Variants (a label without one is `cache_aware`):", "",
                  *(f"- `{v}`: {what}" for v, what in named)]
    for name in opts.workloads:
        rows = [r for r in results if r.result.workload == name]
        lines += ["", f"#### {name}", "", HEADER, "|" + "---|" * COLUMNS, *(_row(r) for r in rows)]
    found = targets(results)
    if found:
        missed = sum(not t.met for t in found)
        lines += ["", "#### Targets (same run: N replicas against 1)", "", "| target | goal | measured | |",
                  "|---|---|---|---|", *(t.row() for t in found), "",
                  f"{len(found) - missed} of {len(found)} met" + (f"; {missed} missed." if missed else ".")]
    return "\n".join(lines) + "\n"


def write_json(results: Sequence[ReplicaResult], opts: Options, command: str, path: Path) -> Path:
    data: dict[str, Any] = {
        "command": command, "machine": machine_line(), "requests_scale": opts.requests_scale, "seed": opts.seed,
        "results": [{"replicas": r.replicas, "front": r.front, "log_stats": r.log_stats,
                     "learned_rates": r.learned_rates,
                     **r.result.to_json(samples=False)} for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, allow_nan=True) + "\n")
    return path


def write_docs(text: str, path: Path | None = None) -> Path:
    return write_section(SECTION, "### Several gateway replicas\n\n" + text, path)
