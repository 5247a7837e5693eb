"""What a replica learns when other replicas share its engines: the prefill time from the
engine's own KV event, and no slowness read into delays that others' work explains."""

from __future__ import annotations

from gateway.endpoints import BackendLoad, Endpoint
from gateway.pickers.base import PREFILL_STARTED
from gateway.pickers.cache_aware import CacheAwareConfig, CacheAwarePolicy
from gateway.prefix_index import PrefixIndex, block_keys
from kvkernel.context import RequestContext
from tests.gateway.test_predicted_ttft import PROMPT, Clock, fleet, request


def sample(picker: CacheAwarePolicy, clock: Clock, ep: Endpoint, queued: float, prefill: float,
           event: bool) -> RequestContext:
    """One attempt: `queued` s behind others' work at the engine, then `prefill` s of its own."""
    ctx = request()
    picker.dispatched(ctx, ep)
    clock.now += queued
    if event:
        ctx[PREFILL_STARTED] = clock.now
    clock.now += prefill
    picker.first_byte(ctx, ep)
    ctx.usage.prompt_tokens, ctx.usage.cached_tokens = PROMPT, 0
    picker.released(ctx, ep)
    clock.now += 1.0
    return ctx


def busy_with_others(ep: Endpoint) -> None:
    ep.load = BackendLoad(num_requests_running=3, num_requests_waiting=2)  # none of them ours


def with_events(ep: Endpoint) -> Endpoint:
    ep.has_event_feed = True
    return ep


def test_the_engine_event_times_the_prefill_without_others_queue() -> None:
    clock = Clock()
    picker, a = CacheAwarePolicy(clock=clock), with_events(fleet("a")[0])
    busy_with_others(a)
    for _ in range(12):
        sample(picker, clock, a, queued=0.5, prefill=PROMPT / 4000, event=True)
    assert 3000 < picker.status()["endpoints"]["a"]["prefill_rate_tokens_per_s"] < 5000


def test_at_an_engine_with_events_an_untimed_sample_teaches_nothing() -> None:
    clock = Clock()
    picker, a = CacheAwarePolicy(clock=clock), with_events(fleet("a")[0])
    sample(picker, clock, a, queued=0.0, prefill=PROMPT / 4000, event=False)  # fully cached, or events late
    assert picker.model("a").speed.samples == 0


def test_without_an_event_others_load_makes_a_sample_teach_nothing() -> None:
    clock = Clock()
    picker, (a,) = CacheAwarePolicy(clock=clock), fleet("a")
    busy_with_others(a)
    sample(picker, clock, a, queued=0.5, prefill=PROMPT / 4000, event=False)
    assert picker.model("a").speed.samples == 0
    a.load = BackendLoad(num_requests_running=0, num_requests_waiting=0)
    sample(picker, clock, a, queued=0.0, prefill=PROMPT / 4000, event=False)
    assert picker.model("a").speed.samples == 1


def test_the_previous_learning_takes_every_delay_for_speed() -> None:
    clock = Clock()
    picker = CacheAwarePolicy(CacheAwareConfig(discount_foreign_load=False), clock=clock)
    a = with_events(fleet("a")[0])
    busy_with_others(a)
    for _ in range(12):
        sample(picker, clock, a, queued=0.5, prefill=PROMPT / 4000, event=True)
    assert picker.status()["endpoints"]["a"]["prefill_rate_tokens_per_s"] < 2500


def test_an_overdue_stream_at_an_engine_busy_with_others_work_is_queue_not_speed() -> None:
    clock = Clock()
    picker, (a,) = CacheAwarePolicy(clock=clock), fleet("a")
    ctx = request()
    a.inflight += 1
    picker.dispatched(ctx, a)
    clock.now += 2.0  # long overdue
    a.load = BackendLoad(num_requests_running=1, num_requests_waiting=0)  # only ours: it proves slowness
    assert picker.pick([a], request()).endpoint is a and request_spt(picker, a) > 1.5 / PROMPT
    busy_with_others(a)
    assert request_spt(picker, a) < 2 / 8000  # the prior's rate still applies to a new prefill


def request_spt(picker: CacheAwarePolicy, ep: Endpoint) -> float:
    ctx = request()
    picker.pick([ep], ctx)
    return (ctx.scores[ep.id] / 1000 - picker.model(ep.id).ahead(picker._clock())) / PROMPT


def test_the_index_notes_when_an_engine_started_a_pending_prefill() -> None:
    """Two requests share a 2-block document at `a`, sent together: the first one's prefill
    stores the document; the second one's starts only when its own last block is stored."""
    clock = Clock()
    index = PrefixIndex(clock=clock)
    doc = list(range(5000, 5032))
    first, second = block_keys(doc + list(range(1, 65))), block_keys(doc + list(range(100, 164)))
    index.expect("a", first)
    index.expect("a", second)
    clock.now = 3.0
    index.stored("b", [1, 2, 3, 4, 5, 6], None, doc + list(range(1, 65)), 16)  # another engine
    assert index.prefill_started("a", first) is None
    clock.now = 4.0
    index.stored("a", [11, 12, 13, 14, 15, 16], None, doc + list(range(1, 65)), 16)
    assert index.prefill_started("a", first) == 4.0 and index.prefill_started("a", second) is None
    clock.now = 5.0
    index.stored("a", [23, 24, 25, 26], 12, list(range(100, 164)), 16)
    assert index.prefill_started("a", second) == 5.0
    index.settle("a", first, served=True, learn=False)
    index.settle("a", second, served=True, learn=False)
    assert index.prefill_started("a", second) is None and index.stats()["started_entries"] == 0
