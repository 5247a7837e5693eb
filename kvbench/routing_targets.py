"""The routing issue's acceptance targets, computed from one suite run's results: kvgate's
`cache_aware` against the oracle, the SGLang router and least_inflight in the same run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvbench.results import PolicyResult

SUBJECT, ORACLE, SGLANG, LEAST = "cache_aware", "oracle", "sglang-router", "least_inflight"


@dataclass(frozen=True, slots=True)
class Target:
    what: str
    measured: float
    goal: float
    at_most: bool  # True: measured <= goal is met; False: measured >= goal

    @property
    def met(self) -> bool:
        return self.measured <= self.goal if self.at_most else self.measured >= self.goal

    def row(self) -> str:
        sign = "<=" if self.at_most else ">="
        return f"| {self.what} | {sign} {self.goal:g} | {self.measured:.3f} | {'met' if self.met else 'MISSED'} |"


def _summary(results: Sequence[PolicyResult], workload: str, policy: str) -> dict[str, Any] | None:
    found = next((r for r in results if r.workload == workload and r.policy == policy and not r.skipped), None)
    return found.summary() if found is not None else None


def _ratio(results: Sequence[PolicyResult], workload: str, other: str, key: str) -> float | None:
    mine, theirs = _summary(results, workload, SUBJECT), _summary(results, workload, other)
    if mine is None or theirs is None or not theirs[key]:
        return None
    return float(mine[key]) / float(theirs[key])


def targets(results: Sequence[PolicyResult]) -> list[Target]:
    found: list[Target] = []

    def add(what: str, value: float | None, goal: float, at_most: bool) -> None:
        if value is not None:
            found.append(Target(what, value, goal, at_most))

    for w in ("burst", "multi-tenant", "skewed", "multi-turn"):
        add(f"{w}: hit ratio / oracle's", _ratio(results, w, ORACLE, "hit_ratio"), 0.98, False)
    for w, goal in (("burst", 1.1), ("multi-tenant", 1.1), ("multi-turn", 1.1), ("skewed", 1.0)):
        add(f"{w}: TTFT p50 / SGLang router's", _ratio(results, w, SGLANG, "ttft_p50_ms"), goal, True)
    for w in ("burst", "multi-tenant", "skewed", "multi-turn", "no-sharing", "heterogeneous"):
        add(f"{w}: TTFT p99 / SGLang router's", _ratio(results, w, SGLANG, "ttft_p99_ms"), 1.0, True)
    add("no-sharing: TTFT p50 / least_inflight's", _ratio(results, "no-sharing", LEAST, "ttft_p50_ms"), 1.05, True)
    skewed = _summary(results, "skewed", SUBJECT)
    if skewed is not None and skewed["backend_mean"]:
        add("skewed: busiest backend / mean", skewed["backend_max"] / skewed["backend_mean"], 1.5, True)
    add("heterogeneous: TTFT p50 / SGLang router's", _ratio(results, "heterogeneous", SGLANG, "ttft_p50_ms"),
        0.7, True)
    return found


def render_targets(results: Sequence[PolicyResult]) -> list[str]:
    rows = targets(results)
    if not rows:
        return []
    missed = sum(not t.met for t in rows)
    return ["", "#### Targets (kvgate `cache_aware`, same run)", "", "| target | goal | measured | |",
            "|---|---|---|---|", *(t.row() for t in rows), "",
            f"{len(rows) - missed} of {len(rows)} met" + (f"; {missed} missed." if missed else ".")]
