"""Output of `kvgate bench routing`: markdown tables, JSON results, TTFT CDF plots.

`render` gives one table per workload; `write_json` every number and sample;
`write_plots` one PNG per workload (TTFT CDF per policy, matplotlib from the
`bench` extra; no plots, with a note, when it is missing); `write_docs` replaces
the routing section of docs/benchmarks.md, with the JSON beside it and the plots
in docs/img/.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvbench.report import default_path, machine_line, write_section
from kvbench.routing_targets import render_targets
from kvbench.workloads import build
from testbed.sim_vllm.tokenizer import SimTokenizer

if TYPE_CHECKING:
    from kvbench.results import PolicyResult
    from kvbench.routing import Options

HEADER = ("| policy | hit ratio | TTFT p50 | p90 | p99 (ms) | e2e p50 | p99 (ms) | req/s "
          "| backend max / mean | errors | kvgate decisions |")


def _fmt(value: float, digits: int = 0) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _row(r: PolicyResult) -> str:
    if r.skipped:
        return f"| {r.label} | skipped: {r.skipped} |||||||||| "
    s = r.summary()
    decisions = ", ".join(f"{k} {v}" for k, v in r.decisions.items()) or "-"
    return (f"| {r.label} | {s['hit_ratio']:.3f} | {_fmt(s['ttft_p50_ms'])} | {_fmt(s['ttft_p90_ms'])} "
            f"| {_fmt(s['ttft_p99_ms'])} | {_fmt(s['e2e_p50_ms'])} | {_fmt(s['e2e_p99_ms'])} "
            f"| {s['throughput_rps']:.1f} | {s['backend_max']} / {s['backend_mean']:.1f} | {s['errors']} "
            f"| {decisions} |")


@functools.lru_cache(maxsize=1)
def suite_tokenizer() -> SimTokenizer:
    """The tokenizer the suite's sims load (the tiny model's, seed 0), for the ceilings."""
    from mlxd.tiny_model import write_model
    from testbed.sim_vllm.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="kvgate-bench-tokenizer-") as tmp:
        return load_tokenizer(write_model(Path(tmp) / "model", "tiny", seed=0))


def render(results: Sequence[PolicyResult], opts: Options, command: str, plots: Sequence[Path],
           plot_base: Path, tokenizer: SimTokenizer | None = None) -> str:
    """The markdown section body: setup, then per workload a table (and its plot, if any)."""
    shape = opts.shape
    lines = [
        f"`{command}`", "",
        f"{shape.backends} sim-vllm backends (KV {shape.capacity_blocks * 16} tokens each, prefill "
        f"{shape.prefill_rate:.0f} tok/s, slow ones {shape.prefill_rate / 10:.0f}), a mock LMCache and one router, "
        f"all fresh for every (workload, policy); policies interleaved per workload; streamed requests, "
        f"{opts.max_tokens} output tokens each, seed {opts.seed}, requests scale {opts.requests_scale}. "
        "Hit ratio = sum of `cached_tokens` / sum of `prompt_tokens` from the responses; the ceiling is what "
        "an ideal router with unbounded caches could reach. TTFT = client side, request sent -> first SSE event; "
        "e2e -> `[DONE]`. Backend max / mean = requests per backend from the sims' own "
        "`vllm:request_success_total`. Peer routers run their `cache_aware` policy at default thresholds.",
    ]
    plot_names = {p.stem.removeprefix("routing-ttft-"): p for p in plots}
    for name in opts.workloads:
        rows = [r for r in results if r.workload == name]
        workload = build(name, opts.requests_scale, opts.seed, tokenizer or suite_tokenizer())
        lines += ["", f"#### {name}", "",
                  f"{workload.description}; hit-ratio ceiling {workload.ceiling:.3f}.", "", HEADER,
                  "|" + "---|" * 11]
        lines += [_row(r) for r in rows]
        if name in plot_names:
            rel = plot_names[name].relative_to(plot_base) if plot_names[name].is_relative_to(plot_base) \
                else plot_names[name]
            lines += ["", f"![TTFT CDF, {name}]({rel.as_posix()})"]
    lines += render_targets(results)
    return "\n".join(lines) + "\n"


def write_json(results: Sequence[PolicyResult], opts: Options, command: str, path: Path,
               samples: bool = True) -> Path:
    """Every number (and, if `samples`, every request's sample) of the run."""
    data: dict[str, Any] = {
        "command": command, "machine": machine_line(), "requests_scale": opts.requests_scale,
        "seed": opts.seed, "max_tokens": opts.max_tokens, "shape": asdict(opts.shape),
        "ceilings": {w: build(w, opts.requests_scale, opts.seed).ceiling for w in opts.workloads},
        "results": [r.to_json(samples) for r in results],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=None if samples else 1, allow_nan=True) + "\n")
    return path


def write_plots(results: Sequence[PolicyResult], out_dir: Path) -> list[Path]:
    """One TTFT CDF PNG per workload (log x axis); [] when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plots")
        return []
    paths = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for workload in dict.fromkeys(r.workload for r in results):
        fig, ax = plt.subplots(figsize=(8.0, 4.0), dpi=100)
        for r in results:
            ttft = sorted(s.ttft_ms for s in r.ok) if r.workload == workload else []
            if ttft:
                ax.step(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], where="post", label=r.label)
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"TTFT CDF: {workload}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        path = out_dir / f"routing-ttft-{workload}.png"
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_docs(results: Sequence[PolicyResult], opts: Options, command: str, path: Path | None = None) -> Path:
    """Replace the routing section of docs/benchmarks.md; JSON (summaries and TTFT CDFs, no
    per-request samples) beside it, plots in docs/img/."""
    path = path if path is not None else default_path().resolve()
    docs = path.parent
    plots = write_plots(results, docs / "img")
    write_json(results, opts, command, docs / "benchmarks-routing.json", samples=False)
    body = render(results, opts, command, plots, docs)
    body += ("\nAll numbers, with each TTFT CDF at every percent: [benchmarks-routing.json](benchmarks-routing.json) "
             "(per-request samples: `routing.json` in `--out`).\n")
    return write_section("routing", body, path)
