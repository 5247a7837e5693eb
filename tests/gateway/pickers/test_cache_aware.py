"""The previous cache_aware scoring (`scoring: tokens`, TokenScoring): table tests of
saturation, balance, scoring and decisions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from filters.keys import CACHE_HINTS, TOKENS, CacheHints, Tokens
from gateway.config import ClusterConfig, EndpointConfig
from gateway.endpoints import BackendLoad, Endpoint, build_cluster
from gateway.pickers.cache_aware import CacheAwareConfig, CacheAwarePolicy
from gateway.pickers.token_scoring import TokenScoring
from gateway.plan import plan_cluster_picker
from kvkernel.context import RequestContext
from kvkernel.decode import FieldError

CFG = CacheAwareConfig(cache_weight=1.0, load_weight=1.0, balance_abs_threshold=16, balance_rel_threshold=1.5,
                       max_waiting=8, max_kv_usage=0.9, prefill_tokens_per_request=256)


@dataclass
class EP:
    inflight: int = 0
    backlog: int = 0
    waiting: int | None = None
    kv: float | None = None
    matched: int = 0


@dataclass
class Case:
    name: str
    endpoints: dict[str, EP]
    expected: str
    decision: str
    prompt_tokens: int = 2048
    config: CacheAwareConfig = field(default_factory=lambda: CFG)


def build(case: Case) -> tuple[list[Endpoint], RequestContext]:
    cluster = build_cluster(ClusterConfig("llm", [EndpointConfig(e, f"http://127.0.0.1:{9000 + i}")
                                                   for i, e in enumerate(case.endpoints)]))
    ctx = RequestContext("r1", "POST", "/v1/completions")
    ctx[TOKENS] = Tokens(list(range(case.prompt_tokens)), "request")
    hints = ctx[CACHE_HINTS] = CacheHints()
    for ep, spec in zip(cluster.endpoints, case.endpoints.values(), strict=True):
        ep.inflight, ep.prefill_backlog = spec.inflight, spec.backlog
        ep.load = BackendLoad(num_requests_waiting=spec.waiting, kv_cache_usage=spec.kv)
        if spec.matched:
            hints.matched_tokens[ep.id] = spec.matched
    return cluster.endpoints, ctx


CASES = [
    Case("no hints: least loaded", {"a": EP(inflight=2), "b": EP(inflight=1), "c": EP(inflight=3)},
         "b", "no_hint_least_load"),
    Case("no hints: prefill backlog outweighs a cheap extra request",
         {"a": EP(inflight=1, backlog=1500), "b": EP(inflight=2, backlog=100)}, "b", "no_hint_least_load"),
    Case("balance guard: fewest requests even with a bigger backlog",
         {"a": EP(inflight=30, matched=2048), "b": EP(inflight=2, backlog=3000), "c": EP(inflight=3)},
         "b", "balance"),
    Case("no hints: equal requests, less prefill backlog wins", {"a": EP(1, backlog=900), "b": EP(1, backlog=10)},
         "b", "no_hint_least_load"),
    Case("holder wins when lightly loaded", {"a": EP(inflight=1), "b": EP(inflight=2, matched=1536)},
         "b", "cache_hit"),
    Case("load beats a small match", {"a": EP(inflight=0), "b": EP(inflight=3, matched=256)},
         "a", "cache_hit_overridden_by_load"),
    Case("prefill backlog counts as load", {"a": EP(), "b": EP(backlog=4000, matched=1024)},
         "a", "cache_hit_overridden_by_load"),
    Case("scraped waiting queue counts as load", {"a": EP(), "b": EP(waiting=6, matched=1024)},
         "a", "cache_hit_overridden_by_load"),
    Case("longer match wins between holders", {"a": EP(matched=512), "b": EP(matched=1536)}, "b", "cache_hit"),
    Case("match is capped at the prompt length",
         {"a": EP(inflight=1, matched=4096), "b": EP(matched=0)}, "a", "cache_hit", prompt_tokens=1024),
    Case("saturated holder (waiting) is skipped", {"a": EP(), "b": EP(waiting=9, matched=2048)},
         "a", "cache_hit_overridden_by_load"),
    Case("saturated holder (kv usage) is skipped", {"a": EP(), "b": EP(kv=0.95, matched=2048)},
         "a", "cache_hit_overridden_by_load"),
    Case("all saturated: scored anyway", {"a": EP(waiting=9), "b": EP(waiting=9, matched=2048)},
         "b", "cache_hit"),
    Case("imbalance ignores affinity", {"a": EP(inflight=30, matched=2048), "b": EP(inflight=2)},
         "b", "balance"),
    Case("gap above abs but below rel threshold: no balance",
         {"a": EP(inflight=40, matched=2048), "b": EP(inflight=30)}, "b", "cache_hit_overridden_by_load",
         config=CacheAwareConfig(cache_weight=1.0, load_weight=1.0, balance_abs_threshold=5,
                                 balance_rel_threshold=1.5, max_waiting=100)),
    Case("gap above abs but below rel threshold: heavy cache weight keeps affinity",
         {"a": EP(inflight=40, matched=2048), "b": EP(inflight=30)}, "a", "cache_hit",
         config=CacheAwareConfig(cache_weight=100.0, load_weight=1.0, balance_abs_threshold=5,
                                 balance_rel_threshold=1.5, max_waiting=100)),
    Case("cache weight zero: pure load", {"a": EP(inflight=1, matched=2048), "b": EP()}, "b",
         "cache_hit_overridden_by_load", config=CacheAwareConfig(cache_weight=0.0)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pick(case: Case) -> None:
    endpoints, ctx = build(case)
    choice = TokenScoring(case.config).pick(endpoints, ctx)
    assert (choice.endpoint.id, choice.kind.value) == (case.expected, case.decision)
    assert set(ctx.scores) <= set(case.endpoints)


def test_scores_are_saved_tokens_minus_load_cost() -> None:
    endpoints, ctx = build(Case("", {"a": EP(inflight=2, backlog=100), "b": EP(matched=1024, waiting=1)}, "", ""))
    TokenScoring(CFG).pick(endpoints, ctx)
    assert ctx.scores == {"a": -(2 * 256 + 100), "b": 1024 - 256}


def test_saturated_endpoints_are_logged_and_not_scored() -> None:
    endpoints, ctx = build(Case("", {"a": EP(), "b": EP(kv=0.99, matched=2048)}, "", ""))
    TokenScoring(CFG).pick(endpoints, ctx)
    assert ctx.log_fields["saturated"] == ["b"] and set(ctx.scores) == {"a"}


def test_ties_rotate() -> None:
    endpoints, _ = build(Case("", {"a": EP(), "b": EP(), "c": EP()}, "", ""))
    policy = TokenScoring(CFG)
    picks = {policy.pick(endpoints, RequestContext(f"r{i}", "POST", "/v1/completions")).endpoint.id
             for i in range(3)}
    assert picks == {"a", "b", "c"}


def test_short_form_builds_cache_aware_with_its_legacy_block() -> None:
    config = ClusterConfig("llm", [EndpointConfig("a", "http://127.0.0.1:9000")], lb_policy="cache_aware",
                           cache_aware={"cache_weight": 2.0})
    picker = plan_cluster_picker(config, 0).build()
    assert isinstance(picker, CacheAwarePolicy) and picker.config.cache_weight == 2.0
    assert picker.config.scoring == "ttft"  # the new default; `scoring: tokens` keeps the old one


def test_scoring_tokens_switch_selects_the_previous_scoring() -> None:
    endpoints, ctx = build(Case("", {"a": EP(inflight=1), "b": EP(inflight=2, matched=1536)}, "", ""))
    choice = CacheAwarePolicy(CacheAwareConfig(scoring="tokens")).pick(endpoints, ctx)
    assert (choice.endpoint.id, choice.kind.value, ctx.scores["b"]) == ("b", "cache_hit", 1536 - 2 * 256)


@pytest.mark.parametrize("weights,expected", [
    ({"cache_weight": math.inf}, "a"),       # "pure affinity": inf * 0 saved tokens must not be NaN
    ({"load_weight": math.inf}, "b"),        # "pure load": inf * 0 cost must not be NaN
])
def test_infinite_or_nan_weights_never_crash_the_picker(weights: dict[str, float], expected: str | None) -> None:
    cluster = build_cluster(ClusterConfig("llm", [EndpointConfig("a", "http://127.0.0.1:9001"),
                                                  EndpointConfig("b", "http://127.0.0.1:9002")]))
    a, b = cluster.endpoints
    a.inflight = 1
    ctx = RequestContext("r", "POST", "/v1/completions")
    ctx[TOKENS] = Tokens(list(range(1024)), "request")
    ctx[CACHE_HINTS] = CacheHints(matched_tokens={"a": 768})
    chosen = TokenScoring(CacheAwareConfig(**weights)).pick(cluster.endpoints, ctx).endpoint
    assert chosen in (a, b) and (expected is None or chosen.id == expected)
    assert not any(math.isnan(score) for score in ctx.scores.values())


def test_nan_weights_are_rejected_by_the_config() -> None:
    with pytest.raises(FieldError):
        CacheAwareConfig(cache_weight=math.nan)
