"""The previous `cache_aware` scoring, in token units (`scoring: tokens`): cache hints
weighed against load, behind a saturation filter. Kept until the predicted-TTFT
scoring has won every benchmark it is compared on.

For the eligible candidates of one request:

1. saturation filter: drop endpoints whose scraped `num_requests_waiting` exceeds
   `max_waiting` or whose KV usage exceeds `max_kv_usage` — unless all are saturated;
2. balance guard (as SGLang's router): with request load = in-flight + scraped
   waiting, if `max - min > balance_abs_threshold` and `max > balance_rel_threshold * min`,
   cache affinity is ignored and the least loaded endpoint wins ("balance");
3. otherwise score = `cache_weight` * predicted saved prefill tokens (the hints'
   matched prefix, capped at the prompt length) - `load_weight` * load cost, where
   load cost = (in-flight + waiting) * `prefill_tokens_per_request` + prefill backlog
   (predicted uncached prompt tokens of in-flight requests). Highest score wins.

Writes `ctx.scores` (endpoint -> score, for the candidates that were scored) and
returns the decision kind: "cache_hit" (the best-matched endpoint won), "cache_hit_overridden_by_load"
(an endpoint with a longer match lost to load or saturation), "balance" (the guard
chose the endpoint with the fewest requests), or "no_hint_least_load" (no candidate
has a match: the least load cost wins). Ties rotate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from filters.keys import matched_tokens, token_ids
from gateway.endpoints import Endpoint
from gateway.pickers.base import Choice
from gateway.pickers.cache_aware_config import CacheAwareConfig
from kvkernel.context import DecisionKind, RequestContext


def is_saturated(ep: Endpoint, config: CacheAwareConfig) -> bool:
    waiting = ep.num_requests_waiting
    usage = ep.kv_cache_usage
    return (waiting is not None and waiting > config.max_waiting) or (usage is not None and usage > config.max_kv_usage)


def request_load(ep: Endpoint) -> int:
    """Requests queued or running at `ep`: the gateway's in-flight plus the backend's waiting queue."""
    return ep.inflight + (ep.num_requests_waiting or 0)


def load_cost(ep: Endpoint, config: CacheAwareConfig) -> float:
    """Prefill tokens ahead of a new request at `ep` (in token units, like the cache term)."""
    return float(request_load(ep) * config.prefill_tokens_per_request + ep.prefill_backlog)


def saved_tokens(ep: Endpoint, ctx: RequestContext) -> int:
    matched = matched_tokens(ctx, ep.id)
    ids = token_ids(ctx)
    if ids is not None:
        matched = min(matched, len(ids))
    return max(0, matched)


class TokenScoring:
    def __init__(self, config: CacheAwareConfig | None = None) -> None:
        self.config = config or CacheAwareConfig()
        self._turn = 0

    def pick(self, candidates: Sequence[Endpoint], ctx: RequestContext) -> Choice:
        cfg = self.config
        pool = [ep for ep in candidates if not is_saturated(ep, cfg)] or list(candidates)
        if len(pool) < len(candidates):
            ctx.log_fields["saturated"] = sorted(ep.id for ep in candidates if ep not in pool)
        best_match = max(saved_tokens(ep, ctx) for ep in candidates)
        loads = [request_load(ep) for ep in pool]
        ctx.scores = {ep.id: self._score(ep, ctx) for ep in pool}
        if best_match == 0:  # every score is -load cost: the least prefill work ahead wins
            return Choice(self._best_scored(pool, ctx), DecisionKind.NO_HINT)
        if self._imbalanced(min(loads), max(loads)):
            return Choice(self._least_loaded(pool), DecisionKind.BALANCE, f"loads {min(loads)}..{max(loads)}")
        chosen = self._best_scored(pool, ctx)
        if saved_tokens(chosen, ctx) >= best_match:
            return Choice(chosen, DecisionKind.CACHE_HIT)
        return Choice(chosen, DecisionKind.CACHE_OVERRIDDEN, f"best match {best_match} tokens elsewhere")

    def _score(self, ep: Endpoint, ctx: RequestContext) -> float:
        """cache term - load term; a zero term stays zero whatever its weight (no inf * 0),
        and a score that is still not a number (inf - inf) ranks last."""
        cfg = self.config
        saved, cost = saved_tokens(ep, ctx), load_cost(ep, cfg)
        score = (cfg.cache_weight * saved if saved else 0.0) - (cfg.load_weight * cost if cost else 0.0)
        return -math.inf if math.isnan(score) else score

    def _best_scored(self, pool: Sequence[Endpoint], ctx: RequestContext) -> Endpoint:
        top = max(ctx.scores[ep.id] for ep in pool)
        return self._rotate([ep for ep in pool if ctx.scores[ep.id] == top])

    def _imbalanced(self, low: int, high: int) -> bool:
        cfg = self.config
        return high - low > cfg.balance_abs_threshold and high > cfg.balance_rel_threshold * low

    def _least_loaded(self, pool: Sequence[Endpoint]) -> Endpoint:
        """Fewest requests, then least prefill cost; ties rotate (the balance guard's choice)."""
        key = {ep.id: (request_load(ep), load_cost(ep, self.config)) for ep in pool}
        low = min(key.values())
        return self._rotate([ep for ep in pool if key[ep.id] == low])

    def _rotate(self, tied: Sequence[Endpoint]) -> Endpoint:
        if len(tied) == 1:
            return tied[0]
        self._turn += 1
        return tied[self._turn % len(tied)]
