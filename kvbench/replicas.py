"""`kvgate bench replicas`: N gateway replicas behind one round-robin front route as one?

For every workload and every N (default 1, 2, 3), interleaved per workload and each on
a fresh fleet (fresh sim-vllm backends and mock LMCache, as in `bench routing`), N
`kvgate serve` processes run the same gateway YAML (`cache_aware`, the engines' KV
events, the local tokenizer; only the port and the access-log file differ), each
subscribed to every engine's events, behind a round-robin front (nginx when installed,
else `kvbench.front`'s aiohttp relay; N = 1 goes through the same front). The same
seeded streamed requests go through the front. Per (workload, N): hit ratio, client
TTFT, requests per backend, errors, and what the replicas' access logs say; the target
is N > 1 within 5 % of N = 1's hit ratio and TTFT p50 in the same run.

`--variants` names designs to compare in the same run (`VARIANTS`: the kvgate setup, the
sims' flags, the scrape interval; any other name is a kvgate setup or picker type); each
runs at every N.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import signal
import sys
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvbench import replicas_report
from kvbench.client import run_workload
from kvbench.fleet import FleetShape, Sim, gateway_yaml, start_fleet_sims
from kvbench.front import FRONTS, start_front
from kvbench.replicas_variants import VARIANTS, Variant, variant
from kvbench.results import PolicyResult, access_log_decisions, backend_requests, engine_ttft, progress_bar
from kvbench.workloads import WORKLOADS, Workload, build
from mlxd.tiny_model import write_model
from testbed.mock_lmcache.harness import start_mock_controller
from testbed.procs import HOST, free_ports, start_kvgate
from testbed.sim_vllm.tokenizer import load_tokenizer

DEFAULT_WORKLOADS = ("burst", "multi-tenant", "skewed", "multi-turn")
@dataclass(frozen=True)
class Options:
    workloads: tuple[str, ...] = DEFAULT_WORKLOADS
    replicas: tuple[int, ...] = (1, 2, 3)
    variants: tuple[str, ...] = ("cache_aware",)
    front: str = "auto"
    requests_scale: float = 1.0
    max_tokens: int = 8
    seed: int = 7
    shape: FleetShape = FleetShape()
    out: Path = Path(".")
    progress: bool = True
    write_docs: bool = True
    keep: Path | None = None  # keep every run's logs (access logs, YAML, process logs) here


@dataclass(slots=True)
class ReplicaResult:
    """One (workload, policy, N) run: the routing suite's result plus what the replicas logged."""

    replicas: int
    front: str
    result: PolicyResult
    access_logs: list[Path] = field(default_factory=list)
    log_stats: dict[str, float] = field(default_factory=dict)
    learned_rates: list[dict[str, float]] = field(default_factory=list)  # per replica: endpoint -> tokens/s


@dataclass(slots=True)
class ReplicaFleet:
    url: str  # the front's
    front: str  # the kind used: nginx or aiohttp
    sims: dict[str, str]
    access_logs: list[Path]
    replicas: list[str] = field(default_factory=list)  # the replicas' base URLs


def learned_rates(replicas: Sequence[str]) -> list[dict[str, float]]:
    """Each replica's learned prefill rate (tokens/s) per endpoint, from its /kvgate/status."""
    rates = []
    for url in replicas:
        with urllib.request.urlopen(url + "/kvgate/status", timeout=5) as resp:  # noqa: S310 - loopback only
            pickers = json.loads(resp.read())["pickers"]
        rates.append({ep: float(m["prefill_rate_tokens_per_s"]) for p in pickers.values()
                      for ep, m in (p.get("state") or {}).get("endpoints", {}).items()})
    return rates


def replica_yaml(design: Variant, sims: dict[str, Sim], access_log: Path, controller_url: str,
                 model_dir: str | None) -> str:
    """Every replica's YAML: the routing suite's kvgate config (the port comes from `--port`)."""
    picker_config = f"{{{design.picker_config}}}" if design.picker_config else ""
    return gateway_yaml(design.setup, sims, 0, access_log, controller_url, model_dir, design.metrics_interval,
                        picker_config)


@contextlib.contextmanager
def open_replicas(design: Variant, n: int, shape: FleetShape, log_dir: Path,
                  front: str = "auto") -> Iterator[ReplicaFleet]:
    """Controller, sims, `n` gateway replicas and the front, ready; all stopped on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    shape = replace(shape, sim_args=(*shape.sim_args, *design.sim_args))
    with contextlib.ExitStack() as stack:
        controller = start_mock_controller(log_dir)
        stack.callback(controller.stop)
        sims = start_fleet_sims(stack, shape, controller, log_dir)
        *ports, front_port = free_ports(n + 1)
        gateways, logs = [], []
        for i, port in enumerate(ports):
            logs.append(log_dir / f"access-{i}.jsonl")
            config = log_dir / f"gateway-{i}.yaml"
            config.write_text(replica_yaml(design, sims, logs[-1], controller.url, shape.model_dir))
            gateway = start_kvgate(f"gateway-{i}", ["serve", "-c", str(config), "--port", str(port)], log_dir)
            stack.callback(gateway.stop)
            gateways.append((gateway, port))
        for gateway, port in gateways:
            gateway.wait_http(f"http://{HOST}:{port}/readyz")
        kind, proc = start_front(front, front_port, [f"http://{HOST}:{p}" for _, p in gateways], log_dir / "front")
        stack.callback(proc.stop)
        url = f"http://{HOST}:{front_port}"
        proc.wait_http(url + "/readyz")
        yield ReplicaFleet(url, kind, {sid: sim.url for sid, sim in sims.items()}, logs,
                           [f"http://{HOST}:{p}" for _, p in gateways])


def run_one(workload: Workload, name: str, n: int, opts: Options, work: Path, tick: object = None) -> ReplicaResult:
    """One (workload, variant, N) on a fresh fleet; a fleet that does not start gives a skipped result."""
    label = f"{n} replica{'s' if n > 1 else ''}" + ("" if name == "cache_aware" else f" ({name})")
    design = variant(name)
    result = PolicyResult(workload.name, f"{name}@{n}", label)
    shape = replace(opts.shape, slow_backends=workload.slow_backends)
    on_done = getattr(tick, "update", None)
    front = opts.front
    try:
        with open_replicas(design, n, shape, work / workload.name / f"{name}-{n}", opts.front) as fleet:
            front = fleet.front
            before, ttft_before = backend_requests(fleet.sims), engine_ttft(fleet.sims)
            samples, elapsed = asyncio.run(run_workload(fleet.url, workload, opts.max_tokens,
                                                        (lambda s: on_done(1)) if on_done else (lambda s: None)))
            after, ttft_after = backend_requests(fleet.sims), engine_ttft(fleet.sims)
            rates = learned_rates(fleet.replicas)
            logs = fleet.access_logs
    except (RuntimeError, TimeoutError, OSError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
        result.skipped = f"failed: {lines[0]} {lines[-1] if len(lines) > 1 else ''}".strip()[:300]
        return ReplicaResult(n, front, result)
    result.samples, result.elapsed_s = samples, elapsed
    result.per_backend = {sim: after[sim] - before.get(sim, 0) for sim in after}
    merged: dict[str, int] = {}
    for path in logs:
        for kind, count in access_log_decisions(path).items():
            merged[kind] = merged.get(kind, 0) + count
    result.decisions = dict(sorted(merged.items(), key=lambda kv: -kv[1]))
    stats = replicas_report.log_stats(logs)
    count = ttft_after[1] - ttft_before[1]
    stats["engine_ttft_mean_ms"] = 1000 * (ttft_after[0] - ttft_before[0]) / count if count else float("nan")
    return ReplicaResult(n, front, result, logs, stats, rates)


def run_suite(opts: Options, work: Path) -> list[ReplicaResult]:
    """Every workload x variant x N on a fresh fleet; the (variant, N) order rotates per workload."""
    results: list[ReplicaResult] = []
    model_dir = write_model(work / "model", "tiny", seed=0)
    opts = replace(opts, shape=replace(opts.shape, model_dir=str(model_dir)))
    tokenizer = load_tokenizer(model_dir)
    workloads = [build(name, opts.requests_scale, opts.seed, tokenizer) for name in opts.workloads]
    runs = [(p, n) for p in opts.variants for n in opts.replicas]
    bar = progress_bar(sum(len(w.requests) for w in workloads) * len(runs), opts.progress)
    for i, workload in enumerate(workloads):
        for name, n in runs[i % len(runs):] + runs[:i % len(runs)]:
            if bar is not None:
                bar.set_description(f"{workload.name} / {name} x{n}")  # type: ignore[attr-defined]
            else:
                print(f"{workload.name} / {name} x{n} ...", file=sys.stderr, flush=True)
            results.append(run_one(workload, name, n, opts, work, bar))
            done = results[-1]
            if done.result.skipped:
                print(f"{workload.name} x{n}: {done.result.skipped}", file=sys.stderr)
            elif bar is None:
                s = done.result.summary()
                print(f"  hit {s['hit_ratio']:.3f}, TTFT p50 {s['ttft_p50_ms']:.0f} ms, errors {s['errors']}",
                      file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()  # type: ignore[attr-defined]
    order = {(p, n): k for k, (p, n) in enumerate(runs)}
    results.sort(key=lambda r: (opts.workloads.index(r.result.workload),
                                order[(r.result.policy.rsplit("@", 1)[0], r.replicas)]))
    return results


def _ints(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"replica counts must be >= 1, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def parse_args(argv: Sequence[str]) -> Options:
    d = Options()
    p = argparse.ArgumentParser(prog="kvgate bench replicas", description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", type=_names, default=d.workloads,
                   help=f"comma-separated (default: {','.join(d.workloads)}; known: {','.join(WORKLOADS)})")
    p.add_argument("--replicas", type=_ints, default=d.replicas, help="comma-separated replica counts (default 1,2,3)")
    p.add_argument("--variants", type=_names, default=d.variants,
                   help="comma-separated designs to compare in the same run (default: cache_aware): "
                        + "; ".join(f"{k}: {v.what}" for k, v in VARIANTS.items())
                        + "; any other name: a kvgate setup or picker type")
    p.add_argument("--front", choices=FRONTS, default=d.front, help="auto: nginx if installed, else aiohttp")
    p.add_argument("--requests-scale", type=float, default=d.requests_scale)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--backends", type=int, default=d.shape.backends)
    p.add_argument("--capacity-blocks", type=int, default=d.shape.capacity_blocks, help="KV blocks (x16 tokens)")
    p.add_argument("--prefill-rate", type=float, default=d.shape.prefill_rate, help="fast backends' tokens/s")
    p.add_argument("--out", type=Path, default=d.out, help="directory for replicas.json")
    p.add_argument("--no-docs", action="store_true", help="do not write the markdown section")
    p.add_argument("--keep", type=Path, metavar="DIR",
                   help="keep every run's logs here (access logs per replica, YAML, process logs)")
    p.add_argument("--no-progress", action="store_true", help="one line per run instead of a progress bar")
    a = p.parse_args(list(argv))
    unknown = [w for w in a.workloads if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}")
    shape = FleetShape(a.backends, 0, a.capacity_blocks, a.prefill_rate)
    return Options(a.workloads, a.replicas, a.variants, a.front, a.requests_scale, a.max_tokens, a.seed, shape,
                   a.out, not a.no_progress, not a.no_docs, a.keep)


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every fleet's processes (their own sessions) are stopped."""
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: Sequence[str]) -> int:
    opts = parse_args(argv)
    _exit_on_sigterm()
    command = "kvgate bench -o docs/benchmarks.md replicas " + shlex.join(argv)
    with tempfile.TemporaryDirectory(prefix="kvgate-bench-replicas-") as tmp:
        results = run_suite(opts, opts.keep or Path(tmp))
        text = replicas_report.render(results, opts, command)
        print(text)
        print(f"written: {replicas_report.write_json(results, opts, command, opts.out / 'replicas.json')}")
        if opts.write_docs:
            print(f"written to {replicas_report.write_docs(text)}")
    ran = [r.result for r in results if not r.result.skipped]
    return 0 if ran and len(ran) == len(results) and all(r.errors == 0 for r in ran) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
