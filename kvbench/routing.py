"""`kvgate bench routing`: kvgate's routing policies against an oracle and the peer routers.

For every workload (kvbench/workloads.py) and every policy, interleaved per
workload and each on a fresh fleet (fresh sim-vllm backends, a fresh mock
LMCache and a fresh router, so no policy inherits a warm cache), the same
seeded streamed requests go through the router. Per (workload, policy): hit
ratio from the responses' usage, client-side TTFT and end-to-end latency,
throughput, requests per backend from the sims' own counters, kvgate's routing
decisions from its access log, errors. The backends' KV capacity (16k tokens
each) is below all shared prefixes together, as in a real fleet: a policy that
spreads every prefix over every backend thrashes their caches.

Policies: kvgate `lb_policy` names (any name is passed to the gateway YAML, so a
new picker is benchmarked by naming it), `oracle` (kvbench/oracle.py: perfect
prefix-group affinity from a header) and the peer routers `sglang-router` and
`vllm-router` with their `cache_aware` policy (installed by
scripts/peer-routers.sh into .peers/; skipped with the reason when absent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from kvbench import routing_report
from kvbench.client import run_workload
from kvbench.fleet import FleetShape, is_kvgate, label, open_fleet
from kvbench.peers import PEERS, unavailable
from kvbench.results import PolicyResult, access_log_decisions, backend_requests, progress_bar
from kvbench.workloads import WORKLOADS, Workload, build
from mlxd.tiny_model import write_model
from testbed.sim_vllm.tokenizer import load_tokenizer

KVGATE_POLICIES = ("cache_aware", "cache_aware_tokens", "cache_aware_v1", "round_robin", "least_inflight")
DEFAULT_POLICIES = (*KVGATE_POLICIES, "oracle", *PEERS)


@dataclass(frozen=True)
class Options:  # not slotted: parse_args reads the class defaults
    workloads: tuple[str, ...] = tuple(WORKLOADS)
    policies: tuple[str, ...] = DEFAULT_POLICIES
    requests_scale: float = 1.0
    max_tokens: int = 8
    seed: int = 7
    shape: FleetShape = FleetShape()
    out: Path = Path(".")
    write_docs: bool = False
    progress: bool = True
    from_json: Path | None = None  # re-render an earlier run instead of running


def run_one(workload: Workload, policy: str, opts: Options, work: Path, progress: object = None) -> PolicyResult:
    """One (workload, policy) on a fresh fleet; a missing peer gives a skipped result."""
    result = PolicyResult(workload.name, policy, label(policy))
    if policy in PEERS and (reason := unavailable(policy)):
        result.skipped = reason
        return result
    shape = replace(opts.shape, slow_backends=workload.slow_backends)
    tick = getattr(progress, "update", None)
    try:
        with open_fleet(policy, shape, work / workload.name / policy) as fleet:
            before = backend_requests(fleet.sims)
            samples, elapsed = asyncio.run(run_workload(fleet.url, workload, opts.max_tokens,
                                                        (lambda s: tick(1)) if tick else (lambda s: None)))
            after = backend_requests(fleet.sims)
    except (RuntimeError, TimeoutError, OSError) as exc:  # a router that does not start (e.g. a bad policy name)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
        result.skipped = f"failed: {lines[0]} {lines[-1] if len(lines) > 1 else ''}".strip()[:300]
        return result
    result.samples, result.elapsed_s = samples, elapsed
    result.per_backend = {sim: after[sim] - before.get(sim, 0) for sim in after}
    if is_kvgate(policy):
        result.decisions = access_log_decisions(fleet.access_log)
    return result


def run_suite(opts: Options) -> list[PolicyResult]:
    """Every workload x policy; policies rotate their order per workload (no fixed first slot).
    The sims and kvgate's local tokenizer share a generated tiny model's tokenizer."""
    results = []
    with tempfile.TemporaryDirectory(prefix="kvgate-bench-routing-") as tmp:
        model_dir = write_model(Path(tmp) / "model", "tiny", seed=0)
        opts = replace(opts, shape=replace(opts.shape, model_dir=str(model_dir)))
        tokenizer = load_tokenizer(model_dir)
        workloads = [build(name, opts.requests_scale, opts.seed, tokenizer) for name in opts.workloads]
        runnable = [p for p in opts.policies if not (p in PEERS and unavailable(p))]
        bar = progress_bar(sum(len(w.requests) for w in workloads) * len(runnable), opts.progress)
        for i, workload in enumerate(workloads):
            order = list(opts.policies[i % len(opts.policies):]) + list(opts.policies[:i % len(opts.policies)])
            for policy in order:
                if bar is not None:
                    bar.set_description(f"{workload.name} / {label(policy)}")  # type: ignore[attr-defined]
                results.append(run_one(workload, policy, opts, Path(tmp), bar))
                if results[-1].skipped:
                    print(f"skipped {policy}: {results[-1].skipped}", file=sys.stderr)
    if bar is not None:
        bar.close()  # type: ignore[attr-defined]
    rank = {p: n for n, p in enumerate(opts.policies)}
    results.sort(key=lambda r: (opts.workloads.index(r.workload), rank[r.policy]))
    return results


def _epilog() -> str:
    lines = ["workloads (at --requests-scale 1):"]
    for name in WORKLOADS:
        lines.append(f"  {name}: {build(name, 1.0).description}")
    lines.append(f"policies: kvgate lb_policy names (default {', '.join(KVGATE_POLICIES)}; any other name is "
                 "passed to the gateway YAML), oracle, " + ", ".join(PEERS) + " (cache_aware; from .peers/)")
    return "\n".join(lines)


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def parse_args(argv: Sequence[str]) -> Options:
    d = Options()
    p = argparse.ArgumentParser(prog="kvgate bench routing", description=__doc__.split("\n\n")[0],
                                epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", type=_names, default=d.workloads, help="comma-separated (default: all)")
    p.add_argument("--policies", type=_names, default=d.policies,
                   help=f"comma-separated (default: {','.join(d.policies)})")
    p.add_argument("--requests-scale", type=float, default=d.requests_scale,
                   help="multiplies every workload's request count (default 1.0)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--backends", type=int, default=d.shape.backends)
    p.add_argument("--capacity-blocks", type=int, default=d.shape.capacity_blocks, help="KV blocks (x16 tokens)")
    p.add_argument("--prefill-rate", type=float, default=d.shape.prefill_rate, help="fast backends' tokens/s")
    p.add_argument("--out", type=Path, default=d.out, help="directory for routing.json and the plots")
    p.add_argument("--write-docs", action="store_true", help="also replace the routing section of "
                   "docs/benchmarks.md (plots go to docs/img/)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--from-json", type=Path, metavar="ROUTING_JSON",
                   help="do not run: re-render the outputs of an earlier run's routing.json")
    a = p.parse_args(list(argv))
    unknown = [w for w in a.workloads if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}")
    shape = FleetShape(a.backends, 0, a.capacity_blocks, a.prefill_rate)
    return Options(a.workloads, a.policies, a.requests_scale, a.max_tokens, a.seed, shape, a.out,
                   a.write_docs, not a.no_progress, a.from_json)


def load_run(path: Path, opts: Options) -> tuple[list[PolicyResult], Options, str]:
    """The results, options and command of an earlier run's `routing.json` (with samples)."""
    data = json.loads(path.read_text())
    results = [PolicyResult.from_json(r) for r in data["results"]]
    opts = replace(opts, workloads=tuple(dict.fromkeys(r.workload for r in results)),
                   policies=tuple(dict.fromkeys(r.policy for r in results)),
                   requests_scale=data["requests_scale"], seed=data["seed"], max_tokens=data["max_tokens"],
                   shape=FleetShape(**data.get("shape", asdict(opts.shape))))
    return results, opts, data["command"]


def main(argv: Sequence[str]) -> int:
    opts = parse_args(argv)
    if opts.from_json is not None:
        results, opts, command = load_run(opts.from_json, opts)
    else:
        command = "kvgate bench routing " + shlex.join(argv)
        results = run_suite(opts)
    json_path = routing_report.write_json(results, opts, command, opts.out / "routing.json")
    plots = routing_report.write_plots(results, opts.out)
    text = routing_report.render(results, opts, command, plots, opts.out)
    print(text)
    print(f"written: {json_path}" + "".join(f", {p}" for p in plots))
    if opts.write_docs:
        path = routing_report.write_docs(results, opts, command)
        print(f"written to {path}")
    ran = [r for r in results if not r.skipped]
    failed = [r for r in results if r.skipped and r.skipped.startswith("failed")]
    return 0 if ran and not failed and all(r.errors == 0 for r in ran) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
