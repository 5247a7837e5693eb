"""Summaries and the markdown report of `kvgate bench overhead` (no I/O here)."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvbench.loadgen import LoadResult


@dataclass
class Scenario:
    """One load shape; results and server CPU seconds accumulate per target over the rounds.
    Targets: "direct" (the backend), "gateway", and optionally "baseline"."""

    name: str
    stream: bool
    concurrency: int
    count: int
    targets: Sequence[str] = ("direct", "gateway")
    results: dict[str, list[LoadResult]] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.results = {t: [] for t in self.targets}
        self.cpu_s = dict.fromkeys(self.targets, 0.0)

    @property
    def key(self) -> str:
        return f"{self.name}@c{self.concurrency}"


@dataclass(frozen=True, slots=True)
class RunInfo:
    rounds: int
    workers: int
    access_log_lines: dict[str, int]  # by gateway target
    other_load_cores: float  # CPU used by processes outside the benchmark, in cores
    baseline_tree: Path | None = None
    profile_markdown: str = ""  # the py-spy breakdown, when one was taken


@dataclass(frozen=True, slots=True)
class TargetStats:
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    ttfb_p50_ms: float
    cpu_us_per_request: float  # of the server process measured (backend direct, gateway through it)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(results: Sequence[LoadResult], cpu_s: float) -> TargetStats:
    """Pool several rounds: throughput over their summed wall time, percentiles over all requests."""
    requests = sum(r.requests for r in results)
    elapsed = sum(r.elapsed_s for r in results)
    latency = [x for r in results for x in r.latency_ms]
    ttfb = [x for r in results for x in r.ttfb_ms]
    return TargetStats(
        requests=requests,
        errors=sum(r.errors for r in results),
        rps=requests / elapsed if elapsed > 0 else 0.0,
        p50_ms=percentile(latency, 50),
        p99_ms=percentile(latency, 99),
        ttfb_p50_ms=percentile(ttfb, 50),
        cpu_us_per_request=cpu_s / requests * 1e6 if requests else math.nan,
    )


@dataclass(frozen=True, slots=True)
class Goal:
    label: str
    value: float
    limit: float
    at_least: bool  # True: value >= limit meets the goal; False: value < limit does
    unit: str

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value < self.limit

    def row(self) -> str:
        sign = ">=" if self.at_least else "<"
        verdict = "met" if self.met else f"missed by {abs(self.value - self.limit):.3g} {self.unit}"
        return f"| {self.label} | {sign} {self.limit:g} {self.unit} | {self.value:.3g} {self.unit} | {verdict} |"


def goals(stats: dict[str, TargetStats], concurrency: int, target: str = "gateway") -> list[Goal]:
    """Issue #2's targets for `target`, from the pooled stats."""
    ns, ns1, st1 = f"non-streaming@c{concurrency}", "non-streaming@c1", "streaming@c1"
    return [
        Goal(f"throughput gateway/direct, non-streaming c={concurrency}",
             stats[f"{ns}/{target}"].rps / stats[f"{ns}/direct"].rps, 0.40, True, "x"),
        Goal("added p50 latency, non-streaming c=1 (no queueing)",
             stats[f"{ns1}/{target}"].p50_ms - stats[f"{ns1}/direct"].p50_ms, 0.3, False, "ms"),
        Goal("added streaming TTFB p50, c=1",
             stats[f"{st1}/{target}"].ttfb_p50_ms - stats[f"{st1}/direct"].ttfb_p50_ms, 0.5, False, "ms"),
        Goal(f"gateway CPU per request, non-streaming c={concurrency}",
             stats[f"{ns}/{target}"].cpu_us_per_request, 150, False, "µs"),
    ]


def _results_table(plan: Sequence[Scenario], stats: dict[str, TargetStats]) -> list[str]:
    lines = ["| scenario | path | req/s | p50 ms | p99 ms | TTFB p50 ms | server CPU µs/req | answered | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in plan:
        for t in s.targets:
            x = stats[f"{s.key}/{t}"]
            lines.append(f"| {s.name} c={s.concurrency} | {t} | {x.rps:.0f} | {x.p50_ms:.3f} | {x.p99_ms:.3f} | "
                         f"{x.ttfb_p50_ms:.3f} | {x.cpu_us_per_request:.0f} | {x.requests} | {x.errors} |")
    return lines


def _added_table(plan: Sequence[Scenario], stats: dict[str, TargetStats]) -> list[str]:
    lines = ["| scenario | path | throughput vs direct | added p50 ms | added p99 ms | added TTFB p50 ms |",
             "|---|---|---:|---:|---:|---:|"]
    for s in plan:
        d = stats[f"{s.key}/direct"]
        for t in s.targets[1:]:
            g = stats[f"{s.key}/{t}"]
            lines.append(f"| {s.name} c={s.concurrency} | {t} | {g.rps / d.rps if d.rps else math.nan:.2f} | "
                         f"{g.p50_ms - d.p50_ms:.3f} | {g.p99_ms - d.p99_ms:.3f} | "
                         f"{g.ttfb_p50_ms - d.ttfb_p50_ms:.3f} |")
    return lines


def _goal_table(plan: Sequence[Scenario], stats: dict[str, TargetStats]) -> list[str]:
    high = max(s.concurrency for s in plan)
    others = [t for t in plan[0].targets if t not in ("direct", "gateway")]
    lines = ["| target (issue #2) | goal | measured | |", "|---|---|---|---|", *(g.row() for g in goals(stats, high))]
    for t in others:
        lines += ["", f"The same targets for `{t}`:", "", "| target (issue #2) | goal | measured | |",
                  "|---|---|---|---|", *(g.row() for g in goals(stats, high, t))]
    return lines


def _ceiling_note(plan: Sequence[Scenario], stats: dict[str, TargetStats], workers: int) -> str:
    """Is the gateway CPU-bound? Compare its one-core ceiling with what it reached."""
    high = max(s.concurrency for s in plan)
    g = stats[f"non-streaming@c{high}/gateway"]
    ceiling = workers * 1e6 / g.cpu_us_per_request if g.cpu_us_per_request > 0 else math.nan
    return (f"CPU ceiling of the gateway ({workers} process{'es' if workers > 1 else ''}): "
            f"{workers} × 1e6 / {g.cpu_us_per_request:.0f} µs ≈ {ceiling:.0f} req/s, reached: {g.rps:.0f} req/s "
            f"(non-streaming c={high}). Near the ceiling the gateway is CPU-bound: its throughput is set by "
            f"its CPU time per request.")


def _relay_note(plan: Sequence[Scenario], stats: dict[str, TargetStats]) -> list[str]:
    """How much of the gateway's cost an aiohttp hop alone already has."""
    if "bare-relay" not in plan[0].targets:
        return []
    high = max(s.concurrency for s in plan)
    g, r = stats[f"non-streaming@c{high}/gateway"], stats[f"non-streaming@c{high}/bare-relay"]
    d1, g1, r1 = (stats[f"non-streaming@c1/{t}"] for t in ("direct", "gateway", "bare-relay"))
    return ["", f"Against the bare aiohttp relay: CPU {g.cpu_us_per_request:.0f} vs {r.cpu_us_per_request:.0f} µs "
                f"per request (non-streaming c={high}); added p50 at c=1 {g1.p50_ms - d1.p50_ms:.3f} vs "
                f"{r1.p50_ms - d1.p50_ms:.3f} ms. The relay's figures are the floor for any aiohttp-based gateway "
                f"on this machine."]


def _ratio_table(plan: Sequence[Scenario], stats: dict[str, TargetStats]) -> list[str]:
    """CPU per request of each gateway path against the bare relay (the price of an aiohttp
    hop) and, for the full chain, against the plain chain: issue budgets, same run."""
    high = max(s.concurrency for s in plan)
    cpu = {t: stats[f"non-streaming@c{high}/{t}"].cpu_us_per_request for t in plan[0].targets}
    if "bare-relay" not in cpu:
        return []
    lines = [f"CPU per request, non-streaming c={high}, against the bare relay ({cpu['bare-relay']:.0f} µs) "
             "and the plain chain, same run:", "", "| path | CPU µs/req | / bare-relay | / gateway (plain chain) |",
             "|---|---:|---:|---:|"]
    for t in ("gateway", "baseline", "gateway-full"):
        if t in cpu:
            lines.append(f"| {t} | {cpu[t]:.0f} | {cpu[t] / cpu['bare-relay']:.2f} | {cpu[t] / cpu['gateway']:.2f} |")
    return lines


def render(plan: Sequence[Scenario], stats: dict[str, TargetStats], info: RunInfo) -> str:
    """The markdown section: setup, per-path figures, what the gateway adds, targets."""
    counts = ", ".join(f"{s.count} at c={s.concurrency}" for s in plan if not s.stream)
    logs = ", ".join(f"{k}: {v}" for k, v in info.access_log_lines.items())
    baseline = (f" `baseline` is the same config served by the code in `{info.baseline_tree}`."
                if info.baseline_tree else "")
    relay = (" `bare-relay` is `kvbench.bare_relay`, the leanest aiohttp relay (no filters, metrics, header "
             "policy or retries): the price of an aiohttp hop itself." if "bare-relay" in plan[0].targets else "")
    if "gateway-full" in plan[0].targets:
        relay += (" `gateway-full` runs the whole cache-aware chain (prompt, tokenizer in process from a generated "
                  "tiny model with its token cache off so every request is tokenized, kvcache without a controller, "
                  "access-log) and the predicted-TTFT `cache_aware` picker.")
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio's own loop: uvloop is not installed"
    lines = [
        "### Gateway overhead (`kvgate bench overhead`)",
        "",
        f"Fake OpenAI backend (`testbed.fake_openai`, {loop}) and `kvgate serve` ({loop}, workers: {info.workers}, "
        f"chain: prompt + access-log to a file) as subprocesses; a separate load-generator process sends "
        f"`POST /v1/completions` over keep-alive connections. {info.rounds} interleaved rounds per scenario "
        f"({', '.join(plan[0].targets)}, then again); requests per round: {counts} (the same for streaming). "
        f"Latency = request sent to body complete; TTFB = to the first body byte. Server CPU = psutil cpu_times "
        f"of the backend (direct) or of the gateway process and its workers alone (gateway), per answered "
        f"request. Access-log lines written ({logs}) include warm-up requests. Other processes on the machine "
        f"used {info.other_load_cores:.2f} cores on average during the run (all paths share 2 cores).{relay}{baseline}",
        "",
        *_results_table(plan, stats),
        "",
        *_added_table(plan, stats),
        "",
        *_goal_table(plan, stats),
        "",
        *_ratio_table(plan, stats),
        "",
        _ceiling_note(plan, stats, info.workers),
        *_relay_note(plan, stats),
    ]
    if info.profile_markdown:
        lines += ["", info.profile_markdown.rstrip()]
    return "\n".join(lines) + "\n"
