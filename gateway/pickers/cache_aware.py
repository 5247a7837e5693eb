"""The `cache_aware` picker: the candidate with the lowest predicted time to first token.

For each eligible candidate `e` of a request of `n` prompt tokens:

    reuse(e)   = prefix tokens `e` holds or is computing now (the cache hints: engine
                 KV events, prefixes in flight there, the controller), capped at n
    ttft(e)    = queue ahead at e + overhead(e) + (n - reuse(e)) / rate(e)
    score(e)   = ttft(e) + duplicate_weight * (best reuse - reuse(e)) / rate(e)

Rates and overheads are learned per endpoint from the gateway's own observations
(`ttft_model.SpeedLearner`), so a slow CPU daemon and a fast GPU server are told
apart; the queue ahead is the endpoint's predicted prefill backlog
(`ttft_model.PrefillQueue`: work decays as it runs, nothing is held through
decode), plus the backend's scraped waiting requests the gateway did not send.
At an engine with a KV-event feed, a sample's prefill time runs from when the engine
scheduled it (its `BlockStored` event for the request's last block; prefills of 256+
tokens, else no sample) to the first byte; elsewhere from the dispatch or the previous
first byte, and not learned from while the engine's gauges show requests this gateway
did not send (another replica's prefills would be measured as this engine's slowness;
`discount_foreign_load`).
The duplicate term charges copying a prefix onto an endpoint that lacks it (it
evicts others' prefixes there). Lowest score wins; among the candidates within
`tie_tolerance` of it, a rendezvous hash of the prompt's new prefix decides
(`tie_break.py`: replicas that did not see each other's requests place a new
prefix on the same engine), or, with `tie_break: rotate`, exact ties rotate.

Before scoring: saturated endpoints (scraped waiting > `max_waiting`, KV usage >
`max_kv_usage`) are dropped unless all are, and the balance guard drops endpoints
whose request load (in-flight + waiting) exceeds the least loaded one's by more
than `balance_abs_threshold` and `balance_rel_threshold` times. With a TTFT
objective (the `slo_header`, in ms), only candidates predicted to meet it are
scored, if any; how often none could is counted.

`scoring: tokens` selects the previous scoring (`token_scoring.TokenScoring`).
`ctx.scores` holds each scored candidate's predicted TTFT in ms; the access log
gets `predicted_ttft_ms` and, after the fact, `ttft_error_ms` (actual - predicted).
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from filters.keys import CACHE_HINTS, hinted_matches, matched_tokens, prompt_block_keys, token_ids
from gateway.endpoints import Endpoint
from gateway.pickers.base import PREFILL_STARTED, Choice, Picker
from gateway.pickers.cache_aware_config import CacheAwareConfig
from gateway.pickers.registry import register_picker
from gateway.pickers.tie_break import near_best, placement_key, rendezvous_pick
from gateway.pickers.token_scoring import TokenScoring, is_saturated, request_load
from gateway.pickers.ttft_model import Attempt, EndpointModel
from kvkernel.blocks import BLOCK_SIZE
from kvkernel.context import DecisionKind, RequestContext, StateKey

__all__ = ["CacheAwareConfig", "CacheAwarePolicy"]

CHARS_PER_TOKEN = 4  # prompt length estimate when the chain produced no token ids
# Event-timed samples only for prefills long enough that the event's delivery (a ms or two)
# is small beside them; shorter ones would teach a near-zero service and a runaway rate.
EVENT_TIMED_MIN_TOKENS = 256


@dataclass(slots=True)
class _Estimate:
    endpoint: Endpoint
    reuse: int
    uncached: int
    queue: float
    service: float
    seconds_per_token: float

    @property
    def ttft(self) -> float:
        return self.queue + self.service


_DISPATCH: StateKey[Attempt] = StateKey("cache_aware.attempt", Attempt)
_ESTIMATES: StateKey[dict[str, _Estimate]] = StateKey("cache_aware.estimates", dict)


@register_picker("cache_aware")
class CacheAwarePolicy(Picker):
    Config = CacheAwareConfig
    consumes = (CACHE_HINTS,)
    weighs_hints = True
    config: CacheAwareConfig

    def __init__(self, config: CacheAwareConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config or CacheAwareConfig())
        self._clock = clock
        self._models: dict[str, EndpointModel] = {}
        self._tokens = TokenScoring(self.config) if self.config.scoring == "tokens" else None
        self._turn = 0
        self._recent: deque[str] = deque(maxlen=self.config.share_window)  # endpoints of the last picks
        self._recent_counts: Counter[str] = Counter()  # picks per endpoint in `_recent`, kept as it moves
        self.slo_requests = 0
        self.slo_unmeetable = 0

    def model(self, endpoint_id: str) -> EndpointModel:
        found = self._models.get(endpoint_id)
        if found is None:
            cfg = self.config
            found = self._models[endpoint_id] = EndpointModel(cfg.prior_prefill_rate, cfg.prior_overhead,
                                                              cfg.forgetting, self._clock)
        return found

    # ---- picking -------------------------------------------------------------------------
    def pick(self, candidates: Sequence[Endpoint], ctx: RequestContext) -> Choice:
        if self._tokens is not None:
            return self._tokens.pick(candidates, ctx)
        pool = self._admissible(candidates, ctx)
        n, matched, now = _prompt_tokens(ctx), hinted_matches(ctx), self._clock()  # the same for every candidate
        estimates = {ep.id: self._estimate(ep, n, matched.get(ep.id, 0), now) for ep in candidates}
        ctx[_ESTIMATES] = estimates
        best_reuse = max(e.reuse for e in estimates.values())
        scored = self._within_slo([estimates[ep.id] for ep in pool], ctx)
        ctx.scores = {e.endpoint.id: round(e.ttft * 1000, 3) for e in scored}
        chosen = self._lowest(scored, best_reuse, ctx)
        self._note_pick(chosen.endpoint.id)
        if best_reuse == 0:
            return Choice(chosen.endpoint, DecisionKind.NO_HINT)
        if chosen.reuse >= best_reuse:
            return Choice(chosen.endpoint, DecisionKind.CACHE_HIT)
        holders = [e for e in estimates.values() if e.reuse >= best_reuse]
        if not any(h.endpoint in pool for h in holders):
            overloaded = ctx.log_fields.get("overloaded") or ()
            if all(h.endpoint.id in overloaded for h in holders):
                return Choice(chosen.endpoint, DecisionKind.BALANCE, "every holder overloaded")
            return Choice(chosen.endpoint, DecisionKind.CACHE_OVERRIDDEN, "every holder saturated or overloaded")
        holder = min(holders, key=lambda e: e.ttft)
        return Choice(chosen.endpoint, DecisionKind.CACHE_OVERRIDDEN,
                      f"predicted {chosen.ttft * 1000:.1f} ms vs {holder.ttft * 1000:.1f} ms at {holder.endpoint.id}")

    def _admissible(self, candidates: Sequence[Endpoint], ctx: RequestContext) -> list[Endpoint]:
        """Saturation filter, then the balance guard (never empty)."""
        cfg = self.config
        pool = [ep for ep in candidates if not is_saturated(ep, cfg)] or list(candidates)
        if len(pool) < len(candidates):
            ctx.log_fields["saturated"] = sorted(ep.id for ep in candidates if ep not in pool)
        loads = [request_load(ep) for ep in pool]
        low = min(loads)
        over_share = self._over_share(pool)
        kept = [ep for ep, load in zip(pool, loads, strict=True) if ep.id not in over_share and not (
            load - low > cfg.balance_abs_threshold and load > cfg.balance_rel_threshold * low)]
        kept = kept or pool
        if len(kept) < len(pool):
            ctx.log_fields["overloaded"] = sorted(ep.id for ep in pool if ep not in kept)
        return kept

    def _over_share(self, pool: Sequence[Endpoint]) -> set[str]:
        """Endpoints that took more than `max_share` times their fair share of the last
        `share_window` picks, fair being proportional to each one's learned prefill rate
        (a fast engine may take more than a slow one): one hot tenant cannot take one backend."""
        cfg = self.config
        picks = len(self._recent)
        if cfg.max_share <= 0 or len(pool) < 2 or picks < cfg.share_window // 2:
            return set()
        counts = self._recent_counts
        rates = {ep.id: self.model(ep.id).speed.rate for ep in pool}
        total = sum(rates.values())
        return {ep.id for ep in pool if counts[ep.id] > cfg.max_share * picks * rates[ep.id] / total}

    def _note_pick(self, endpoint_id: str) -> None:
        recent, counts = self._recent, self._recent_counts
        if len(recent) == recent.maxlen:  # the oldest pick leaves the window
            oldest = recent[0]
            counts[oldest] -= 1
            if not counts[oldest]:
                del counts[oldest]
        recent.append(endpoint_id)
        counts[endpoint_id] += 1

    def _estimate(self, ep: Endpoint, n: int, matched: int, now: float) -> _Estimate:
        """`n` prompt tokens, of which the hints credit `ep` with `matched`."""
        reuse = min(n, matched)
        model = self.model(ep.id)
        uncached = max(0, n - reuse)
        # Work this gateway did not send explains an overdue stream as well as a slow engine does:
        # then the delay proves nothing about the rate, for the queue nor for this prefill.
        proves = not (self.config.discount_foreign_load and _foreign_load(ep))
        queue = model.ahead(now, proves) + self._foreign_waiting(ep, model)
        spt = model.seconds_per_token(now, proves)
        return _Estimate(ep, reuse, uncached, queue, model.speed.overhead + uncached * spt, spt)

    @staticmethod
    def _foreign_waiting(ep: Endpoint, model: EndpointModel) -> float:
        """Requests waiting at the backend that this gateway did not send (other replicas,
        direct clients), each costed at the endpoint's typical service time."""
        waiting = ep.num_requests_waiting or 0
        foreign = max(0, waiting - model.queue.pending)
        return foreign * model.speed.predict(256) if foreign else 0.0

    def _within_slo(self, estimates: list[_Estimate], ctx: RequestContext) -> list[_Estimate]:
        slo = _slo_seconds(ctx.headers.get(self.config.slo_header))
        if slo is None:
            return estimates
        self.slo_requests += 1
        meeting = [e for e in estimates if e.ttft <= slo]
        ctx.log_fields["ttft_slo_ms"] = round(slo * 1000, 3)
        if not meeting:
            self.slo_unmeetable += 1
            ctx.log_fields["ttft_slo_unmeetable"] = True
            return estimates
        return meeting

    def _lowest(self, estimates: list[_Estimate], best_reuse: int, ctx: RequestContext) -> _Estimate:
        weight = self.config.duplicate_weight

        def score(e: _Estimate) -> float:
            missing = best_reuse - e.reuse
            dup = weight * missing * e.seconds_per_token if missing > 0 else 0.0
            total = e.ttft + dup
            return math.inf if math.isnan(total) else total

        scores = [score(e) for e in estimates]
        cfg = self.config
        key = placement_key(prompt_block_keys(ctx), best_reuse, BLOCK_SIZE) if cfg.tie_break == "rendezvous" else None
        if key is not None and len(estimates) > 1:
            near = [estimates[i] for i in near_best(scores, cfg.tie_tolerance, cfg.tie_tolerance_min)]
            return rendezvous_pick(near, key, lambda e: e.endpoint.id)
        top = min(scores)
        tied = [e for e, s in zip(estimates, scores, strict=True) if s == top]
        if len(tied) == 1:
            return tied[0]
        self._turn += 1
        return tied[self._turn % len(tied)]

    # ---- the attempt's lifecycle: queue accounting and learning --------------------------
    def dispatched(self, ctx: RequestContext, endpoint: Endpoint) -> None:
        if self._tokens is not None:
            return
        estimate = (ctx.get(_ESTIMATES) or {}).get(endpoint.id) or self._estimate(
            endpoint, _prompt_tokens(ctx), matched_tokens(ctx, endpoint.id), self._clock())
        model = self.model(endpoint.id)
        now = self._clock()
        predicted_ttft = model.ahead(now, not (self.config.discount_foreign_load and _foreign_load(endpoint))) \
            + estimate.service
        end = model.queue.dispatch(estimate.service)
        attempt = ctx[_DISPATCH] = Attempt(endpoint.id, estimate.uncached, estimate.service, predicted_ttft,
                                           now, end, ctx.stream,
                                           foreign_load=self.config.discount_foreign_load and _foreign_load(endpoint))
        model.dispatch(attempt)
        ctx.log_fields["predicted_ttft_ms"] = round(predicted_ttft * 1000, 3)

    def first_byte(self, ctx: RequestContext, endpoint: Endpoint) -> None:
        sent = ctx.get(_DISPATCH)
        if sent is None or sent.endpoint != endpoint.id or sent.first_byte_seen:
            return
        sent.first_byte_seen = True
        model = self.model(endpoint.id)
        model.settle(sent)
        queue = model.queue
        if not ctx.stream:
            # A non-streamed answer's first byte comes after its whole decode: it says
            # nothing about prefill. Its predicted prefill already decayed from the queue.
            queue.leave()
            return
        sent.observed_service = queue.first_byte(sent.predicted_end, sent.dispatched_at)
        sent.foreign_load = sent.foreign_load or (self.config.discount_foreign_load and _foreign_load(endpoint))
        started = ctx.get(PREFILL_STARTED) if self.config.discount_foreign_load else None
        if started is not None and sent.dispatched_at <= started:  # not an earlier attempt's
            sent.engine_service = self._clock() - started
        actual = self._clock() - sent.dispatched_at
        model.record_error(actual, sent.predicted_ttft)
        ctx.log_fields["ttft_error_ms"] = round((actual - sent.predicted_ttft) * 1000, 3)

    def released(self, ctx: RequestContext, endpoint: Endpoint) -> None:
        sent = ctx.pop(_DISPATCH)
        if sent is None or sent.endpoint != endpoint.id:
            return
        model = self.model(endpoint.id)
        model.settle(sent)
        if not sent.first_byte_seen:
            model.queue.abandon(sent.predicted_end - self._clock())
            return
        if sent.observed_service is None:
            return
        usage = ctx.usage
        uncached = sent.uncached
        if usage.prompt_tokens is not None and usage.cached_tokens is not None:
            uncached = max(0, usage.prompt_tokens - usage.cached_tokens)
        if not self.config.discount_foreign_load:
            model.speed.observe(uncached, sent.observed_service)
        elif endpoint.has_event_feed:  # timed by the engine's own event, or not at all: no queue inside
            if sent.engine_service is not None and uncached >= EVENT_TIMED_MIN_TOKENS:
                model.speed.observe(uncached, sent.engine_service)
        elif not sent.foreign_load:  # else others' prefills may have run inside the observed time
            model.speed.observe(uncached, sent.observed_service)

    def forget(self, endpoint_id: str) -> None:
        self._models.pop(endpoint_id, None)

    # ---- what operators see --------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "scoring": self.config.scoring,
            "slo": {"requests": self.slo_requests, "unmeetable": self.slo_unmeetable},
            "endpoints": {
                ep: {"prefill_rate_tokens_per_s": round(m.speed.rate, 1),
                     "overhead_ms": round(m.speed.overhead * 1000, 3), "samples": m.speed.samples,
                     "queue_ms": round(m.ahead(self._clock()) * 1000, 3), "pending_prefills": m.queue.pending,
                     "mean_abs_ttft_error_ms": round(m.abs_error * 1000, 3)}
                for ep, m in sorted(self._models.items())},
        }

    def gauges(self) -> list[tuple[str, str, float]]:
        out: list[tuple[str, str, float]] = []
        for ep, m in sorted(self._models.items()):
            out += [(ep, "prefill_rate_tokens_per_second", m.speed.rate), (ep, "overhead_seconds", m.speed.overhead),
                    (ep, "queue_seconds", m.ahead(self._clock())), (ep, "ttft_abs_error_seconds", m.abs_error)]
        return out


def _foreign_load(ep: Endpoint) -> bool:
    """The engine's last scrape shows more requests running or waiting than this gateway has in
    flight there (another replica's, direct clients')."""
    load = ep.load
    return (load.num_requests_running or 0) + (load.num_requests_waiting or 0) > ep.inflight


def _prompt_tokens(ctx: RequestContext) -> int:
    ids = token_ids(ctx)
    if ids is not None:
        return len(ids)
    body = ctx.body
    return len(body) // CHARS_PER_TOKEN if body else 0


def _slo_seconds(raw: str | None) -> float | None:
    if not raw:
        return None
    try:
        ms = float(raw)
    except ValueError:
        return None
    return ms / 1000 if math.isfinite(ms) and ms > 0 else None
