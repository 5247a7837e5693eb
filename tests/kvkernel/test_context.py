"""The request context's typed state and the routing decision's rendering."""

from __future__ import annotations

import pytest

from kvkernel.context import DecisionKind, RequestContext, RoutingDecision, StateKey


def test_state_keys_are_compared_by_identity_not_name() -> None:
    ctx = RequestContext("r", "POST", "/v1/completions")
    public: StateKey[int] = StateKey("count", int)
    private: StateKey[int] = StateKey("count", int)  # same name, another module's own key
    ctx[public] = 1
    assert (ctx.get(public), ctx.get(private), ctx.get(private, 0)) == (1, None, 0)
    assert public in ctx and private not in ctx
    with pytest.raises(KeyError):
        ctx[private]
    assert ctx.pop(public) == 1 and ctx.pop(public) is None and public not in ctx


@pytest.mark.parametrize(("decision", "rendered"), [
    (RoutingDecision(DecisionKind.POLICY, "round_robin"), "lb:round_robin"),
    (RoutingDecision(DecisionKind.FAILOVER, "cache_aware", "cache_hit", 2), "failover:cache_aware"),
    (RoutingDecision(DecisionKind.POLICY), "lb"),
    (RoutingDecision(DecisionKind.CACHE_HIT, "cache_aware"), "cache_hit"),
    (RoutingDecision(DecisionKind.CACHE_OVERRIDDEN, "cache_aware"), "cache_hit_overridden_by_load"),
    (RoutingDecision(DecisionKind.PREFERRED, "least_inflight"), "preferred"),
    (RoutingDecision(DecisionKind.LOCAL_REPLY, reason="stopped by auth"), "local_reply"),
])
def test_render_qualifies_only_load_balancing_and_failover_by_picker(decision: RoutingDecision,
                                                                      rendered: str) -> None:
    assert decision.render() == rendered


def test_retries_count_attempts_after_the_first() -> None:
    ctx = RequestContext("r", "GET", "/")
    assert ctx.retries == 0
    ctx.attempts = 3
    assert ctx.retries == 2
