"""`kvgate bench routing`: cache-aware routing against round-robin and least-inflight.

For each policy, in the same run and on a fresh stack (so no policy inherits a
warm cache): `kvgate mock-lmcache`, N `kvgate sim-vllm` backends reporting their
chunks to it, and `kvgate serve` with that policy. The same seeded shared-prefix
workload goes through each gateway: G long "system prompts", each request one of
them plus a unique question, streamed with usage. Per policy it reports the
prefix-cache hit ratio (sum of `cached_tokens` / sum of `prompt_tokens`, from the
responses), TTFT p50/p99 (client side: request sent -> first SSE event) and the
gateway's routing decisions (from its access log). The backends' KV capacity is
smaller than all prefixes together, as in a real fleet: a policy that spreads
every prefix over every backend thrashes their caches.

The cache-aware gateway runs prompt + tokenizer (remote, a sim's /tokenize) +
kvcache + access-log; the baselines run prompt + access-log, so cache-aware also
pays for tokenizing and the lookup in its TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from kvbench.report import DEFAULT_PATH, write_section
from testbed.mock_lmcache.harness import ControllerProcess, start_mock_controller
from testbed.procs import HOST, ManagedProcess, free_ports, kvgate_cmd, start_kvgate

POLICIES = ("cache_aware", "round_robin", "least_inflight")


@dataclass(frozen=True)
class Options:  # not slotted: parse_args reads the class defaults
    backends: int = 4
    groups: int = 16
    prefix_words: int = 1500
    suffix_words: int = 30
    requests: int = 1000
    concurrency: int = 8
    max_tokens: int = 8
    capacity_blocks: int = 1000  # x 16 tokens per block: 16k tokens of KV per backend
    prefill_rate: float = 8000.0
    seed: int = 7
    output: Path | None = DEFAULT_PATH


@dataclass(slots=True)
class Sample:
    ttft_ms: float
    prompt_tokens: int
    cached_tokens: int


@dataclass(slots=True)
class PolicyResult:
    policy: str
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    tiers: Counter[str] = field(default_factory=Counter)
    per_endpoint: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0

    @property
    def hit_ratio(self) -> float:
        prompt = sum(s.prompt_tokens for s in self.samples)
        return sum(s.cached_tokens for s in self.samples) / prompt if prompt else 0.0

    def ttft(self, q: float) -> float:
        values = sorted(s.ttft_ms for s in self.samples)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q * len(values)))]


def workload(opts: Options) -> list[str]:
    """The seeded request prompts: a group's shared prefix + a unique question."""
    rng = random.Random(opts.seed)
    prefixes = [f"System prompt {g}:" + "".join(f" w{rng.randrange(10**6)}" for _ in range(opts.prefix_words))
                for g in range(opts.groups)]
    return [prefixes[rng.randrange(opts.groups)] + f" Question {i}:"
            + "".join(f" q{rng.randrange(10**6)}" for _ in range(opts.suffix_words))
            for i in range(opts.requests)]


def sim_argv(backend_id: str, port: int, controller: ControllerProcess | None, *extra: str) -> list[str]:
    argv = ["sim-vllm", "--id", backend_id, "--port", str(port), "--host", HOST, *extra]
    if controller is not None:
        argv += ["--lmcache-controller", HOST, "--lmcache-ports", json.dumps(controller.ports),
                 "--heartbeat-interval", "0.5"]
    return kvgate_cmd(*argv)


def start_sims(n: int, controller: ControllerProcess | None, log_dir: Path,
               *extra: str, prefix: str = "sim") -> dict[str, tuple[int, ManagedProcess]]:
    """`n` sim-vllm backends on free ports: id -> (port, process), ready to serve."""
    sims: dict[str, tuple[int, ManagedProcess]] = {}
    try:
        for i, port in enumerate(free_ports(n)):
            sim_id = f"{prefix}-{i}"
            proc = ManagedProcess(sim_id, sim_argv(sim_id, port, controller, *extra), log_dir / f"{sim_id}.log")
            sims[sim_id] = (port, proc.start())
        for port, proc in sims.values():
            proc.wait_http(f"http://{HOST}:{port}/health")
    except BaseException:
        for _, proc in sims.values():
            proc.stop()
        raise
    return sims


def gateway_yaml(policy: str, ports: dict[str, int], port: int, access_log: Path,
                 controller_url: str | None) -> str:
    endpoints = "\n".join(f'      - {{id: {sid}, url: "http://{HOST}:{p}"}}' for sid, p in ports.items())
    first = next(iter(ports.values()))
    cache_filters = "" if policy != "cache_aware" else f"""
  - type: tokenizer
    config: {{backend: remote, endpoint: "http://{HOST}:{first}", timeout: 500ms}}
  - type: kvcache
    config: {{lmcache_endpoint: "{controller_url}", lookup_timeout: 50ms}}"""
    return f"""
server: {{host: {HOST}, port: {port}}}
clusters:
  - name: llm
    lb_policy: {policy}
    health_check: {{path: /health, interval: 1s, timeout: 1s}}
    metrics_interval: 500ms
    timeouts: {{connect: 1s, first_byte: 120s}}
    endpoints:
{endpoints}
routes:
  - {{match: {{prefix: /v1/}}, cluster: llm}}
filters:
  - type: prompt{cache_filters}
  - type: access-log
    config: {{path: "{access_log}"}}
"""


async def _one(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> Sample:
    body = {"model": "sim-vllm", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    usage: dict[str, object] = {}
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            if ttft is None:
                ttft = (time.perf_counter() - t0) * 1000
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
    details = usage.get("prompt_tokens_details") or {}
    assert isinstance(details, dict) and ttft is not None
    return Sample(ttft, int(usage.get("prompt_tokens", 0)), int(details.get("cached_tokens") or 0))  # type: ignore[call-overload]


async def drive(url: str, prompts: Sequence[str], concurrency: int, max_tokens: int,
                result: PolicyResult) -> None:
    """Send `prompts` in order over `concurrency` workers; record samples and errors."""
    queue = list(reversed(prompts))
    timeout = aiohttp.ClientTimeout(total=300)

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            prompt = queue.pop()
            try:
                result.samples.append(await _one(session, url, prompt, max_tokens))
            except (aiohttp.ClientError, RuntimeError, ValueError, AssertionError):
                result.errors += 1

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - t0


def run_policy(policy: str, opts: Options, prompts: Sequence[str], work: Path) -> PolicyResult:
    log_dir = work / policy
    controller = start_mock_controller(log_dir)
    sims: dict[str, tuple[int, ManagedProcess]] = {}
    gateway: ManagedProcess | None = None
    try:
        sims = start_sims(opts.backends, controller, log_dir, "--capacity-blocks", str(opts.capacity_blocks),
                          "--prefill-rate", str(opts.prefill_rate))
        (port,) = free_ports(1)
        access_log = log_dir / "access.jsonl"
        config = log_dir / "gateway.yaml"
        config.write_text(gateway_yaml(policy, {s: p for s, (p, _) in sims.items()}, port, access_log,
                                       controller.url))
        gateway = start_kvgate("gateway", ["serve", "-c", str(config)], log_dir)
        gateway.wait_http(f"http://{HOST}:{port}/readyz")
        result = PolicyResult(policy)
        asyncio.run(drive(f"http://{HOST}:{port}/v1/completions", prompts, opts.concurrency, opts.max_tokens,
                          result))
        gateway.stop()
        for line in access_log.read_text().splitlines():
            record = json.loads(line)
            result.decisions[str(record.get("decision"))] += 1
            result.tiers[str(record.get("tier"))] += 1
            result.per_endpoint[str(record.get("endpoint"))] += 1
        return result
    finally:
        if gateway is not None:
            gateway.stop()
        for _, proc in sims.values():
            proc.stop()
        controller.stop()


def render(results: Sequence[PolicyResult], opts: Options) -> str:
    lines = [
        f"{opts.backends} sim-vllm backends (KV capacity {opts.capacity_blocks * 16} tokens each, prefill "
        f"{opts.prefill_rate:.0f} tok/s), mock LMCache; {opts.requests} streamed completions at concurrency "
        f"{opts.concurrency}: {opts.groups} shared prefixes of ~{opts.prefix_words} tokens + a unique "
        f"~{opts.suffix_words}-token question each (seed {opts.seed}). Fresh stack per policy, same requests. "
        "Hit ratio = sum of `cached_tokens` / sum of `prompt_tokens` from the responses (the unique questions "
        "cap it near 0.98); TTFT is client-side, request sent -> first SSE event. Every policy starts cold, "
        "so in short runs the p99 is the start-up burst of cold prefills, the same for all.",
        "",
        "| policy | prefix-cache hit ratio | TTFT p50 (ms) | TTFT p99 (ms) | mean TTFT (ms) | errors | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mean = statistics.fmean(s.ttft_ms for s in r.samples) if r.samples else float("nan")
        lines.append(f"| {r.policy} | {r.hit_ratio:.3f} | {r.ttft(0.5):.1f} | {r.ttft(0.99):.1f} | {mean:.1f} "
                     f"| {r.errors} | {r.elapsed_s:.1f} |")
    lines.append("")
    for r in results:
        decisions = ", ".join(f"{k}: {v}" for k, v in r.decisions.most_common())
        spread = ", ".join(f"{k}: {v}" for k, v in sorted(r.per_endpoint.items()))
        lines.append(f"- {r.policy}: decisions {decisions}; tiers {dict(r.tiers)}; per backend {spread}")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> Options:
    d = Options()
    p = argparse.ArgumentParser(prog="kvgate bench routing", description=__doc__.split("\n\n")[0])
    for name in ("backends", "groups", "prefix_words", "suffix_words", "requests", "concurrency", "max_tokens",
                 "capacity_blocks", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--prefill-rate", type=float, default=d.prefill_rate)
    p.add_argument("--output", type=Path, default=d.output, help="benchmarks file to update")
    p.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    args = p.parse_args(list(argv))
    output = None if args.no_write else args.output
    return Options(args.backends, args.groups, args.prefix_words, args.suffix_words, args.requests,
                   args.concurrency, args.max_tokens, args.capacity_blocks, args.prefill_rate, args.seed, output)


def main(argv: Sequence[str]) -> int:
    opts = parse_args(argv)
    prompts = workload(opts)
    results = []
    with tempfile.TemporaryDirectory(prefix="kvgate-bench-routing-") as tmp:
        for policy in POLICIES:
            print(f"routing bench: {policy} ...", flush=True)
            results.append(run_policy(policy, opts, prompts, Path(tmp)))
    text = render(results, opts)
    print(text)
    if opts.output is not None:
        write_section("routing", text, opts.output)
        print(f"written to {opts.output}")
    return 0 if all(r.errors == 0 for r in results) else 1
