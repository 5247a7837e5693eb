"""The replicas' tie-break: table tests of its pure parts, and two `cache_aware` pickers that
never saw each other's requests placing a new prefix on the same endpoint."""

from __future__ import annotations

import random

import pytest

from filters.keys import CACHE_HINTS, TOKENS, CacheHints, Tokens
from gateway.pickers.cache_aware import CacheAwareConfig, CacheAwarePolicy
from gateway.pickers.tie_break import near_best, placement_key, rendezvous_pick, rendezvous_weight
from kvkernel.blocks import block_keys
from kvkernel.context import DecisionKind, RequestContext
from tests.gateway.test_predicted_ttft import Clock, fleet


def request(tokens: list[int], matched: dict[str, int] | None = None) -> RequestContext:
    ctx = RequestContext("r", "POST", "/v1/completions", {}, stream=True)
    ctx[TOKENS] = Tokens(tokens, "request")
    ctx[CACHE_HINTS] = CacheHints("prefix-index" if matched else "none", dict(matched or {}))
    return ctx


@pytest.mark.parametrize(("keys", "reuse", "expected"), [
    ([11, 12, 13], 0, 11),  # nobody holds anything: the first block
    ([11, 12, 13], 16, 12),  # one block held somewhere: the first new one
    ([11, 12, 13], 40, 13),  # a partial block counts as not held
    ([11, 12, 13], 48, 13),  # all held: the last block
    ([11, 12, 13], 999, 13),
    ([], 0, None),  # shorter than a block
    (None, 0, None),  # no tokens
])
def test_placement_key_is_the_first_block_no_one_holds(keys: list[int] | None, reuse: int,
                                                       expected: int | None) -> None:
    assert placement_key(keys, reuse, 16) == expected


@pytest.mark.parametrize(("scores", "relative", "absolute", "expected"), [
    ([1.0, 1.05, 1.2], 0.1, 0.0, [0, 1]),
    ([1.0, 1.05, 1.2], 0.0, 0.0, [0]),
    ([0.010, 0.0115, 0.013], 0.1, 0.002, [0, 1]),  # the absolute floor for short prefills
    ([float("inf"), 2.0], 0.1, 0.0, [1]),
    ([0.5, 0.5], 0.0, 0.0, [0, 1]),  # exact ties always
])
def test_near_best(scores: list[float], relative: float, absolute: float, expected: list[int]) -> None:
    assert near_best(scores, relative, absolute) == expected


def test_rendezvous_is_stable_and_spreads_keys() -> None:
    ids = ["sim-0", "sim-1", "sim-2", "sim-3"]
    assert rendezvous_weight(-5, "sim-0") == rendezvous_weight(-5, "sim-0") != rendezvous_weight(-5, "sim-1")
    winners = [rendezvous_pick(ids, key, str) for key in range(-200, 200)]
    assert all(w == rendezvous_pick(list(reversed(ids)), k, str) for k, w in zip(range(-200, 200), winners,
                                                                                   strict=True))
    assert {w: winners.count(w) for w in ids}.keys() == set(ids) and min(map(winners.count, ids)) > 50
    # Removing a non-winner never moves a key (only the leaving endpoint's keys move).
    assert all(rendezvous_pick(ids[:3], k, str) == w for k, w in zip(range(-200, 200), winners, strict=True)
               if w != "sim-3")


def test_two_replicas_that_never_talked_place_a_new_prefix_on_the_same_endpoint() -> None:
    """Replica 1 has sent other work around (its turn counter, queue and learned rates differ
    from replica 2's); a new prefix still lands on the same endpoint on both, and different
    new prefixes spread over the endpoints."""
    rng = random.Random(3)
    one, two = CacheAwarePolicy(clock=Clock()), CacheAwarePolicy(clock=Clock())
    eps1, eps2 = fleet("a", "b", "c"), fleet("a", "b", "c")
    one.model("b").speed.observe(1000, 0.13)  # replica 1 learned something of b; replica 2 did not
    placed = []
    for _ in range(30):
        prompt = [rng.randrange(50_000) for _ in range(600)]
        first, second = one.pick(eps1, request(prompt)), two.pick(eps2, request(prompt))
        assert first.endpoint.id == second.endpoint.id and first.kind is DecisionKind.NO_HINT
        placed.append(first.endpoint.id)
    assert set(placed) == {"a", "b", "c"}


def test_a_clear_load_gap_still_beats_the_hash() -> None:
    """The tolerance is small: an endpoint with a queue is not a tie."""
    prompt = list(range(1000, 1600))
    key = placement_key(block_keys(prompt), 0, 16)
    assert key is not None
    favourite = rendezvous_pick(["a", "b"], key, str)
    picker = CacheAwarePolicy(clock=Clock())
    eps = {ep.id: ep for ep in fleet("a", "b")}
    busy = request(list(range(5000, 6000)))
    eps[favourite].inflight += 1
    picker.dispatched(busy, eps[favourite])  # ~125 ms of prefill queued at the favourite
    chosen = picker.pick(list(eps.values()), request(prompt)).endpoint.id
    assert chosen != favourite


def test_rotate_keeps_the_previous_behaviour() -> None:
    picker = CacheAwarePolicy(CacheAwareConfig(tie_break="rotate"), clock=Clock())
    eps = fleet("a", "b")
    prompt = list(range(600))
    assert {picker.pick(eps, request(prompt)).endpoint.id for _ in range(4)} == {"a", "b"}


def test_holders_keep_winning_over_the_hash() -> None:
    prompt = list(range(2000, 2600))
    for holder in ("a", "b"):
        choice = CacheAwarePolicy(clock=Clock()).pick(fleet("a", "b"), request(prompt, {holder: 512}))
        assert (choice.endpoint.id, choice.kind) == (holder, DecisionKind.CACHE_HIT)
