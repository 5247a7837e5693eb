"""The `cache_aware` picker's predicted-TTFT scoring: table tests and its learning loop."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from filters.keys import CACHE_HINTS, TOKENS, CacheHints, Tokens
from gateway.config import ClusterConfig, EndpointConfig
from gateway.endpoints import BackendLoad, Endpoint, build_cluster
from gateway.pickers.cache_aware import CacheAwareConfig, CacheAwarePolicy
from kvkernel.context import DecisionKind, RequestContext

PROMPT = 1100  # tokens


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fleet(*ids: str) -> list[Endpoint]:
    return build_cluster(ClusterConfig("llm", [EndpointConfig(e, f"http://127.0.0.1:{9000 + i}")
                                               for i, e in enumerate(ids)])).endpoints


def request(matched: dict[str, int] | None = None, tokens: int = PROMPT,
            headers: dict[str, str] | None = None) -> RequestContext:
    ctx = RequestContext("r", "POST", "/v1/completions", headers or {}, stream=True)
    ctx[TOKENS] = Tokens(list(range(tokens)), "request")
    ctx[CACHE_HINTS] = CacheHints("prefix-index" if matched else "none", dict(matched or {}))
    return ctx


def send(picker: CacheAwarePolicy, endpoints: Sequence[Endpoint], ctx: RequestContext) -> Endpoint:
    """Pick, then dispatch there (as the proxy does)."""
    chosen = picker.pick(endpoints, ctx).endpoint
    chosen.inflight += 1
    picker.dispatched(ctx, chosen)
    return chosen


def test_no_hints_the_shortest_predicted_queue_wins() -> None:
    picker, (a, b) = CacheAwarePolicy(clock=Clock()), fleet("a", "b")
    assert send(picker, [a, b], request()) in (a, b)
    first = a if a.inflight else b
    choice = picker.pick([a, b], request())
    assert choice.endpoint is not first and choice.kind is DecisionKind.NO_HINT


def test_a_prefix_still_prefilling_counts_as_a_future_hit() -> None:
    """The second request of a prefix whose first one is prefilling on `a` follows it
    (the old token scoring sent it to the idle `b`, which prefilled it again)."""
    picker, (a, b) = CacheAwarePolicy(clock=Clock()), fleet("a", "b")
    send(picker, [a], request())
    choice = picker.pick([a, b], request({"a": 1088}))  # in flight at a (the prefix index says so)
    assert (choice.endpoint.id, choice.kind) == ("a", DecisionKind.CACHE_HIT)


def test_one_hot_prefix_cannot_take_one_backend() -> None:
    """After a window of picks all on `a` (one hot tenant), `a` is over its fair share:
    the next request of that prefix goes to `b` (the prefix is copied there)."""
    picker = CacheAwarePolicy(CacheAwareConfig(share_window=8, max_share=1.5), clock=Clock())
    a, b = fleet("a", "b")
    choices = [picker.pick([a, b], request({"a": 1088})) for _ in range(6)]
    assert [c.endpoint.id for c in choices[:4]] == ["a"] * 4  # half a window: the guard is not armed yet
    assert choices[4].endpoint.id == "b" and choices[4].kind is DecisionKind.BALANCE
    assert picker.pick([a, b], request({"a": 1088, "b": 1088})).endpoint.id in ("a", "b")


def test_a_fast_engine_may_take_more_than_an_even_share() -> None:
    clock = Clock()
    picker = CacheAwarePolicy(CacheAwareConfig(share_window=20, max_share=1.5), clock=clock)
    slow, fast = fleet("slow", "fast")
    teach(picker, clock, slow, rate=900.0)
    teach(picker, clock, fast, rate=9000.0)
    picks = [picker.pick([slow, fast], request({"fast": 1088})).endpoint.id for _ in range(20)]
    assert picks.count("fast") == 20  # ~91% of the capacity: 1.5x its share is never reached


def test_without_a_duplicate_cost_the_idle_endpoint_is_faster() -> None:
    picker, (a, b) = CacheAwarePolicy(CacheAwareConfig(duplicate_weight=0.0), clock=Clock()), fleet("a", "b")
    send(picker, [a], request())
    choice = picker.pick([a, b], request({"a": 1088}))
    assert (choice.endpoint.id, choice.kind) == ("b", DecisionKind.CACHE_OVERRIDDEN)
    assert "predicted" in choice.reason


def test_a_long_queue_at_the_holder_overrides_affinity() -> None:
    clock = Clock()
    picker, (a, b) = CacheAwarePolicy(clock=clock), fleet("a", "b")
    for _ in range(8):  # eight cold 1100-token prefills queued at a
        send(picker, [a], request(tokens=PROMPT))
    choice = picker.pick([a, b], request({"a": 1024}))
    assert (choice.endpoint.id, choice.kind) == ("b", DecisionKind.CACHE_OVERRIDDEN)
    assert request_scores(picker, [a, b], {"a": 1024})["a"] > 1000  # > 1 s predicted there


def request_scores(picker: CacheAwarePolicy, endpoints: list[Endpoint], matched: dict[str, int]) -> dict[str, float]:
    ctx = request(matched)
    picker.pick(endpoints, ctx)
    return ctx.scores


def teach(picker: CacheAwarePolicy, clock: Clock, endpoint: Endpoint, rate: float, n: int = 12) -> None:
    """Run `n` requests through the picker's lifecycle on `endpoint` at `rate` tokens/s."""
    for i in range(n):
        tokens = 200 + 150 * i
        ctx = request(tokens=tokens)
        picker.dispatched(ctx, endpoint)
        clock.now += 0.002 + tokens / rate
        picker.first_byte(ctx, endpoint)
        ctx.usage.prompt_tokens, ctx.usage.cached_tokens = tokens, 0
        picker.released(ctx, endpoint)
        clock.now += 1.0


def test_learned_speeds_send_work_to_the_fast_engine_despite_its_queue() -> None:
    clock = Clock()
    picker, (slow, fast) = CacheAwarePolicy(clock=clock), fleet("slow", "fast")
    teach(picker, clock, slow, rate=450.0)
    teach(picker, clock, fast, rate=9000.0)
    status = picker.status()["endpoints"]
    assert status["slow"]["prefill_rate_tokens_per_s"] == pytest.approx(450, rel=0.15)
    assert status["fast"]["prefill_rate_tokens_per_s"] == pytest.approx(9000, rel=0.15)
    send(picker, [fast], request())  # the fast one is busy with a cold prefill
    assert picker.pick([slow, fast], request()).endpoint is fast
    assert dict((ep, name) for ep, name, _ in picker.gauges()).keys() == {"slow", "fast"}


def test_the_slo_keeps_only_endpoints_predicted_to_meet_it() -> None:
    clock = Clock()
    picker, (a, b) = CacheAwarePolicy(clock=clock), fleet("a", "b")
    send(picker, [a], request())
    # a holds the prefix and is a little slower (its queue); b would duplicate it. Without an
    # objective a wins on the duplicate cost; with 146 ms, only b (142.5 ms) is predicted to meet it.
    assert picker.pick([a, b], request({"a": 1088})).endpoint is a
    ctx = request({"a": 1088}, headers={"x-kvgate-ttft-slo-ms": "146"})
    assert picker.pick([a, b], ctx).endpoint is b and set(ctx.scores) == {"b"}
    impossible = request(headers={"x-kvgate-ttft-slo-ms": "1"})
    picker.pick([a, b], impossible)
    assert impossible.log_fields["ttft_slo_unmeetable"] is True
    assert picker.status()["slo"] == {"requests": 2, "unmeetable": 1}


@pytest.mark.parametrize("header", ["", "soon", "-5", "nan", "inf"])
def test_a_bad_slo_header_is_ignored(header: str) -> None:
    picker, (a, b) = CacheAwarePolicy(clock=Clock()), fleet("a", "b")
    ctx = request(headers={"x-kvgate-ttft-slo-ms": header})
    picker.pick([a, b], ctx)
    assert "ttft_slo_ms" not in ctx.log_fields


def test_the_balance_guard_takes_an_overloaded_holder_out() -> None:
    picker, (a, b) = CacheAwarePolicy(CacheAwareConfig(balance_abs_threshold=4), clock=Clock()), fleet("a", "b")
    a.inflight = 12
    ctx = request({"a": 1088})
    choice = picker.pick([a, b], ctx)
    assert (choice.endpoint.id, choice.kind) == ("b", DecisionKind.BALANCE) and ctx.log_fields["overloaded"] == ["a"]


def test_a_saturated_holder_is_overridden() -> None:
    picker, (a, b) = CacheAwarePolicy(clock=Clock()), fleet("a", "b")
    a.load = BackendLoad(num_requests_waiting=40)
    ctx = request({"a": 1088})
    choice = picker.pick([a, b], ctx)
    assert (choice.endpoint.id, choice.kind) == ("b", DecisionKind.CACHE_OVERRIDDEN)
    assert ctx.log_fields["saturated"] == ["a"]


def test_prediction_and_its_error_reach_the_access_log_fields() -> None:
    clock = Clock()
    picker, (a,) = CacheAwarePolicy(clock=clock), fleet("a")
    ctx = request()
    picker.pick([a], ctx)
    picker.dispatched(ctx, a)
    predicted = ctx.log_fields["predicted_ttft_ms"]
    clock.now += 0.5
    picker.first_byte(ctx, a)
    assert ctx.log_fields["ttft_error_ms"] == pytest.approx(500 - predicted, abs=0.01)
    picker.released(ctx, a)
    assert picker.status()["endpoints"]["a"]["samples"] == 1


def test_an_attempt_that_fails_before_its_first_byte_leaves_the_queue() -> None:
    clock = Clock()
    picker, (a,) = CacheAwarePolicy(clock=clock), fleet("a")
    ctx = request()
    picker.dispatched(ctx, a)
    assert picker.model("a").queue.ahead() > 0
    picker.released(ctx, a)
    assert picker.model("a").queue.ahead() == 0 and picker.model("a").speed.samples == 0


def test_a_non_streamed_first_byte_teaches_nothing_about_prefill() -> None:
    clock = Clock()
    picker, (a,) = CacheAwarePolicy(clock=clock), fleet("a")
    ctx = request()
    ctx.stream = False
    picker.dispatched(ctx, a)
    clock.now += 5.0  # the whole generation, decode included
    picker.first_byte(ctx, a)
    picker.released(ctx, a)
    assert picker.model("a").speed.samples == 0 and picker.model("a").queue.pending == 0


def test_an_overdue_stream_proves_an_engine_slower_before_any_sample() -> None:
    """Cold start: nothing learned yet, one stream dispatched to `slow` is long overdue.
    New prompts go to `fast` (the old prior alone would rate both the same)."""
    clock = Clock()
    picker, (slow, fast) = CacheAwarePolicy(clock=clock), fleet("slow", "fast")
    send(picker, [slow], request())  # predicted ~0.14 s at the prior's 8000 tokens/s
    send(picker, [fast], request())
    clock.now += 0.15
    picker.first_byte(last_fast := request(), fast)  # unrelated ctx: ignored
    assert last_fast.log_fields == {}
    clock.now += 2.0  # slow has been prefilling for 2.15 s without a first byte
    model = picker.model("slow")
    assert model.seconds_per_token(clock.now) > 1.5 / PROMPT
    assert model.predict(PROMPT, clock.now) > 2.0  # the next cold prompt would take as long there
    assert picker.pick([slow, fast], request()).endpoint is fast
