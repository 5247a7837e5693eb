"""`kvgate bench overhead`: what the gateway adds on top of a fast backend.

Starts a fake OpenAI backend and `kvgate serve` (chain: prompt + access-log) as
subprocesses, then drives the same load directly and through the gateway from a
load generator in its own process, in interleaved rounds (direct, gateway,
direct, gateway, ...): non-streaming and streaming at concurrency 32, and both
again at concurrency 1 (no queueing). Gateway CPU time per request comes from
psutil's cpu_times of the gateway process (and its workers) around its rounds.
Prints the figures against issue #2's targets and writes them to
docs/benchmarks.md (section "overhead").

A third path goes through `kvbench.bare_relay`, the leanest aiohttp relay: what
the gateway adds beyond it is its own work. `--baseline-tree DIR` adds a fourth:
the same gateway config served by the code in another source tree (e.g.
`git archive` of an older commit), for before/after comparisons in one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from kvbench.loadgen import LoadgenProcess, LoadJob, LoadResult
from kvbench.overhead_profile import Breakdown, PySpy, find_py_spy, group, render_breakdown
from kvbench.overhead_report import RunInfo, Scenario, TargetStats, render, summarize
from kvbench.report import default_path, write_section
from testbed.procs import HOST, ManagedProcess, free_ports, kvgate_cmd

PROMPT = ("You are a helpful assistant. Summarise the following text in one sentence. " * 6).strip()

GATEWAY_YAML = """\
server: {{host: {host}, port: {port}, workers: {workers}}}
clusters:
  - name: bench
    lb_policy: least_inflight
    endpoints:
      - {{id: fake-1, url: "http://{host}:{backend_port}", kind: vllm}}
routes:
  - {{match: {{prefix: /v1/}}, cluster: bench}}
filters:
  - type: prompt
  - type: access-log
    config: {{path: "{access_log}"}}
"""


FULL_CHAIN_YAML = """\
server: {{host: {host}, port: {port}, workers: {workers}}}
clusters:
  - name: bench
    picker: {{type: cache_aware}}
    endpoints:
      - {{id: fake-1, url: "http://{host}:{backend_port}", kind: vllm}}
routes:
  - {{match: {{prefix: /v1/}}, cluster: bench}}
filters:
  - type: prompt
  - type: tokenizer
    config: {{backend: local, model_dir: "{model_dir}", cache: {{max_size: {token_cache}}}}}
  - type: kvcache
    config: {kvcache}
  - type: access-log
    config: {{path: "{access_log}"}}
"""


def full_chain_yaml(port: int, backend_port: int, model_dir: Path, access_log: Path, *, workers: int = 1,
                    token_cache: int = 0, kvcache: str = "{}") -> str:
    """The whole cache-aware chain in front of one backend (`overhead` and `soak`); the
    token cache holds `token_cache` prompts (0: every request is tokenized)."""
    return FULL_CHAIN_YAML.format(host=HOST, port=port, backend_port=backend_port, workers=workers,
                                  model_dir=model_dir, access_log=access_log, token_cache=token_cache,
                                  kvcache=kvcache)


@dataclass(frozen=True)
class Options:  # not slotted: parse_args reads the class defaults
    requests: int = 4000  # per round, at the high concurrency
    serial_requests: int = 600  # per round, at concurrency 1
    rounds: int = 3
    concurrency: int = 32
    warmup: int = 300
    workers: int = 1
    output: Path | None = None  # None: do not write the results file
    cprofile: Path | None = None  # profile the gateway with cProfile into this file
    baseline_tree: Path | None = None  # also measure a gateway served from this source tree
    py_spy: bool = False  # after the rounds, sample the gateway with py-spy under one more round
    bare_relay: bool = True  # also measure the leanest aiohttp relay (kvbench.bare_relay)
    full_chain: bool = True  # also measure the whole cache-aware chain (gateway-full)


@dataclass
class Stack:
    """The servers of one run: `processes` by target name ("direct" is the backend)."""

    processes: dict[str, ManagedProcess]
    urls: dict[str, str]
    access_logs: dict[str, Path]
    _ps: dict[str, psutil.Process] = field(default_factory=dict)

    def cpu_seconds(self, target: str) -> float:
        """User + system CPU of the target's server process and its children (workers)."""
        if target not in self._ps:
            proc = self.processes[target].proc
            assert proc is not None
            self._ps[target] = psutil.Process(proc.pid)
        root = self._ps[target]
        return sum(sum(p.cpu_times()[:2]) for p in [root, *root.children(recursive=True)])

    def pids(self) -> set[int]:
        return {p.proc.pid for p in self.processes.values() if p.proc is not None}

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()


def _start_gateway(name: str, workdir: Path, port: int, backend_port: int, opts: Options,
                   tree: Path | None) -> tuple[ManagedProcess, Path]:
    access_log = workdir / f"{name}-access.jsonl"
    config = workdir / f"{name}.yaml"
    if name == "gateway-full":
        config.write_text(full_chain_yaml(port, backend_port, workdir / "model", access_log, workers=opts.workers))
    else:
        config.write_text(GATEWAY_YAML.format(host=HOST, port=port, backend_port=backend_port,
                                              workers=opts.workers, access_log=access_log))
    args = kvgate_cmd("serve", "-c", str(config), "--log-level", "WARNING")
    if opts.cprofile is not None and tree is None:
        args = [sys.executable, "-m", "cProfile", "-o", str(opts.cprofile), *args[1:]]
    process = ManagedProcess(name, args, workdir / f"{name}.log")
    if tree is None:
        return process.start(), access_log
    # Another tree: its packages shadow this one's (cwd and PYTHONPATH come first on sys.path).
    with open(process.log_path, "ab") as log:
        process.proc = subprocess.Popen(args, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return process, access_log


def start_stack(workdir: Path, opts: Options) -> Stack:
    """Start the fake backend and the gateway(s) on free ports; wait until all answer."""
    backend_port, gateway_port, baseline_port, relay_port, full_port = free_ports(5)
    backend = ManagedProcess("direct", [sys.executable, "-m", "testbed.fake_openai", "--port", str(backend_port)],
                             workdir / "fake-backend.log").start()
    stack = Stack({"direct": backend}, {"direct": f"http://{HOST}:{backend_port}/v1/completions"}, {})
    gateways: dict[str, tuple[int, Path | None]] = {"gateway": (gateway_port, None)}
    if opts.baseline_tree is not None:
        gateways["baseline"] = (baseline_port, opts.baseline_tree.resolve())
    if opts.full_chain:
        from mlxd.tiny_model import write_model

        write_model(workdir / "model", "tiny", seed=0)
        gateways["gateway-full"] = (full_port, None)
    try:
        for name, (port, tree) in gateways.items():
            stack.processes[name], stack.access_logs[name] = _start_gateway(name, workdir, port, backend_port,
                                                                            opts, tree)
            stack.urls[name] = f"http://{HOST}:{port}/v1/completions"
        if opts.bare_relay:
            stack.processes["bare-relay"] = ManagedProcess(
                "bare-relay", [sys.executable, "-m", "kvbench.bare_relay", "--port", str(relay_port), "--upstream",
                               f"http://{HOST}:{backend_port}"], workdir / "bare-relay.log").start()
            stack.urls["bare-relay"] = f"http://{HOST}:{relay_port}/v1/completions"
        backend.wait_http(f"http://{HOST}:{backend_port}/health")
        for name, port in [*((n, p) for n, (p, _) in gateways.items()), ("bare-relay", relay_port)]:
            if name in stack.processes:
                stack.processes[name].wait_http(f"http://{HOST}:{port}/readyz")
    except Exception:
        stack.stop()
        raise
    return stack


def scenarios(opts: Options, targets: Sequence[str]) -> list[Scenario]:
    return [
        Scenario("non-streaming", False, opts.concurrency, opts.requests, targets),
        Scenario("streaming", True, opts.concurrency, opts.requests, targets),
        Scenario("non-streaming", False, 1, opts.serial_requests, targets),
        Scenario("streaming", True, 1, opts.serial_requests, targets),
    ]


def request_body(stream: bool) -> dict[str, object]:
    return {"model": "fake-model", "prompt": PROMPT, "max_tokens": 16, "stream": stream}


def _measured(loadgen: LoadgenProcess, stack: Stack, target: str, job: LoadJob) -> tuple[LoadResult, float]:
    """Run one job; its result and the CPU seconds the target's server used meanwhile."""
    before = stack.cpu_seconds(target)
    result = loadgen.run(job)
    return result, stack.cpu_seconds(target) - before


def run_rounds(opts: Options, stack: Stack, loadgen: LoadgenProcess) -> list[Scenario]:
    """Interleaved rounds: for every scenario, each target in turn, `opts.rounds` times."""
    plan = scenarios(opts, list(stack.urls))
    for scenario in plan:  # warm every path (connections, caches) before measuring
        for url in stack.urls.values():
            loadgen.run(LoadJob(url, request_body(scenario.stream), scenario.concurrency,
                                min(opts.warmup, scenario.count)))
    for _ in range(opts.rounds):
        for scenario in plan:
            for target, url in stack.urls.items():
                job = LoadJob(url, request_body(scenario.stream), scenario.concurrency, scenario.count)
                result, cpu = _measured(loadgen, stack, target, job)
                scenario.results[target].append(result)
                scenario.cpu_s[target] += cpu
    return plan


def _others_cpu(stack: Stack, loadgen: LoadgenProcess) -> float:
    """CPU seconds used so far by every process except this benchmark's own."""
    ours = stack.pids() | {loadgen.pid, os.getpid()}
    total = psutil.cpu_times()
    busy = total.user + total.system + getattr(total, "nice", 0.0)
    for pid in ours:
        try:
            busy -= sum(psutil.Process(pid).cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return float(busy)  # approximate: loopback softirq time is not always charged to a process


def profile_gateway(opts: Options, stack: Stack, loadgen: LoadgenProcess, workdir: Path) -> str:
    """One more non-streaming round with py-spy attached to the gateway: the markdown breakdown."""
    exe = find_py_spy()
    assert exe is not None, "parse_args checks that py-spy is installed"
    process = stack.processes["gateway"].proc
    assert process is not None
    spy = PySpy(exe, process.pid, workdir / "py-spy.txt")
    try:
        job = LoadJob(stack.urls["gateway"], request_body(False), opts.concurrency, opts.requests)
        result, cpu = _measured(loadgen, stack, "gateway", job)
    finally:
        raw = spy.stop()
    samples, shares = group(raw)
    breakdown = Breakdown(samples, shares, cpu / max(1, result.requests) * 1e6)
    return render_breakdown(breakdown, result.requests, opts.concurrency)


def run_benchmark(opts: Options) -> tuple[list[Scenario], dict[str, TargetStats], RunInfo]:
    """Run the whole benchmark: (scenarios, stats by "scenario/target", run facts)."""
    with tempfile.TemporaryDirectory(prefix="kvgate-bench-") as tmp:
        stack = start_stack(Path(tmp), opts)
        loadgen = LoadgenProcess().start()
        try:
            others0, wall0 = _others_cpu(stack, loadgen), time.monotonic()
            plan = run_rounds(opts, stack, loadgen)
            others = max(0.0, (_others_cpu(stack, loadgen) - others0) / (time.monotonic() - wall0))
            profile = profile_gateway(opts, stack, loadgen, Path(tmp)) if opts.py_spy else ""
        finally:
            loadgen.close()
            stack.stop()
        log_lines = {name: len(path.read_text().splitlines()) if path.exists() else 0
                     for name, path in stack.access_logs.items()}
    stats = {f"{s.key}/{t}": summarize(s.results[t], s.cpu_s[t]) for s in plan for t in s.targets}
    info = RunInfo(opts.rounds, opts.workers, log_lines, others, opts.baseline_tree, profile)
    return plan, stats, info


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(prog="kvgate bench overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=Options.requests,
                        help="requests per round at --concurrency (default %(default)s)")
    parser.add_argument("--serial-requests", type=int, default=Options.serial_requests,
                        help="requests per round at concurrency 1 (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=Options.rounds, help="interleaved rounds (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=Options.concurrency)
    parser.add_argument("--warmup", type=int, default=Options.warmup, help="warm-up requests per path")
    parser.add_argument("--workers", type=int, default=Options.workers, help="gateway server.workers")
    parser.add_argument("--output", type=Path, default=None,
                        help="benchmarks markdown file (default: kvgate bench -o, else ./benchmarks.md)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the markdown file alone")
    parser.add_argument("--baseline-tree", type=Path, help="also measure the gateway of this source tree")
    parser.add_argument("--no-bare-relay", action="store_true",
                        help="skip the reference path through a minimal aiohttp relay")
    parser.add_argument("--no-full-chain", action="store_true",
                        help="skip the gateway running the whole cache-aware chain (gateway-full)")
    parser.add_argument("--py-spy", action="store_true",
                        help="after the rounds, break the gateway's CPU down by component with py-spy")
    parser.add_argument("--cprofile", type=Path, help="run the gateway under cProfile, write stats here "
                                                      "(slows the gateway: figures are not comparable)")
    args = parser.parse_args(argv)
    for name in ("requests", "serial_requests", "rounds", "concurrency", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.baseline_tree is not None and not (args.baseline_tree / "gateway" / "serve.py").is_file():
        parser.error(f"--baseline-tree {args.baseline_tree}: no gateway/serve.py there")
    if args.py_spy and (find_py_spy() is None or args.workers != 1 or args.cprofile):
        parser.error("--py-spy needs py-spy installed (pip install py-spy), --workers 1 and no --cprofile")
    return Options(args.requests, args.serial_requests, args.rounds, args.concurrency, max(1, args.warmup),
                   args.workers, None if args.no_write else (args.output or default_path()), args.cprofile,
                   args.baseline_tree,
                   args.py_spy, not args.no_bare_relay, not args.no_full_chain)


def main(argv: Sequence[str]) -> int:
    opts = parse_args(argv)
    plan, stats, info = run_benchmark(opts)
    markdown = render(plan, stats, info)
    print(markdown)
    if opts.cprofile is not None:
        print(f"\ncProfile of the gateway written to {opts.cprofile} (not writing docs: profiled figures)")
    elif opts.output is not None:
        print(f"\nwritten to {write_section('overhead', markdown, opts.output)}")
    errors = sum(s.errors for s in stats.values())
    return 0 if all(s.requests for s in stats.values()) and not errors else 1
