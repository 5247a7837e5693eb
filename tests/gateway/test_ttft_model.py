"""The TTFT model: the online speed learner and the serial prefill queue."""

from __future__ import annotations

import random

import pytest

from gateway.pickers.ttft_model import PrefillQueue, SpeedLearner


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("rate,overhead", [(450.0, 0.02), (8000.0, 0.005), (60000.0, 0.002)])
def test_learner_finds_each_engines_speed_from_a_shared_prior(rate: float, overhead: float) -> None:
    learner = SpeedLearner(prior_rate=5000.0, prior_overhead=0.005)
    rng = random.Random(7)
    for _ in range(40):
        uncached = rng.randint(16, 2000)
        learner.observe(uncached, overhead + uncached / rate + rng.uniform(-0.001, 0.001))
    assert learner.rate == pytest.approx(rate, rel=0.1)
    assert learner.predict(1000) == pytest.approx(overhead + 1000 / rate, rel=0.1)


def test_prior_holds_until_samples_arrive() -> None:
    learner = SpeedLearner(prior_rate=8000.0, prior_overhead=0.005)
    assert learner.predict(8000) == pytest.approx(1.005)
    assert learner.samples == 0


def test_one_outlier_cannot_swing_the_fit() -> None:
    learner = SpeedLearner(prior_rate=8000.0, prior_overhead=0.005)
    for _ in range(30):
        learner.observe(800, 0.005 + 0.1)
    before = learner.predict(800)
    learner.observe(800, 30.0)  # a stall that had nothing to do with prefill speed
    assert learner.predict(800) < before * 1.5


def test_nonsense_samples_are_ignored() -> None:
    learner = SpeedLearner(prior_rate=8000.0, prior_overhead=0.005)
    for service in (float("nan"), float("inf"), -1.0):
        learner.observe(100, service)
    learner.observe(-5, 0.1)
    assert learner.samples == 0


def test_queue_serialises_dispatched_prefills_and_decays_with_time() -> None:
    clock = Clock()
    queue = PrefillQueue(clock)
    assert queue.ahead() == 0.0
    end_a = queue.dispatch(0.2)
    end_b = queue.dispatch(0.3)
    assert (end_a, end_b) == (pytest.approx(100.2), pytest.approx(100.5))
    assert queue.ahead() == pytest.approx(0.5)
    clock.now = 100.1
    assert queue.ahead() == pytest.approx(0.4)  # work decays as it runs


def test_an_early_first_byte_pulls_the_queue_forward() -> None:
    clock = Clock()
    queue = PrefillQueue(clock)
    end_a = queue.dispatch(0.2)
    queue.dispatch(0.3)
    clock.now = 100.05  # a finished 0.15 s early (a cache hit the model did not expect)
    service = queue.first_byte(end_a, dispatched_at=100.0)
    assert service == pytest.approx(0.05)
    assert queue.ahead() == pytest.approx(0.3)  # b starts now


def test_the_next_requests_service_starts_at_the_previous_first_byte() -> None:
    clock = Clock()
    queue = PrefillQueue(clock)
    end_a = queue.dispatch(0.2)
    end_b = queue.dispatch(0.2)
    clock.now = 100.2
    queue.first_byte(end_a, dispatched_at=100.0)
    clock.now = 100.45
    assert queue.first_byte(end_b, dispatched_at=100.0) == pytest.approx(0.25)  # not 0.45: it waited for a
    assert (queue.pending, queue.ahead()) == (0, 0.0)


def test_an_abandoned_request_takes_its_remaining_work_away() -> None:
    clock = Clock()
    queue = PrefillQueue(clock)
    queue.dispatch(0.2)
    end_b = queue.dispatch(0.5)
    queue.abandon(end_b - clock.now - 0.2)  # b's own 0.5 s, not a's share
    assert queue.ahead() == pytest.approx(0.2)
