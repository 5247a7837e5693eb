from __future__ import annotations

from kvkernel.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_then_half_open_then_closes() -> None:
    clock, changes = Clock(), []
    breaker = CircuitBreaker("x", failure_threshold=3, recovery_timeout=10, half_open_max_calls=2, clock=clock,
                             on_change=lambda name, state: changes.append(state))
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow() and not breaker.available()
    clock.now = 9.9
    assert breaker.state is BreakerState.OPEN
    clock.now = 10.0
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow() and breaker.allow() and not breaker.allow()  # two trial calls only
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_a_failed_trial_reopens_and_success_resets_the_count() -> None:
    clock = Clock()
    breaker = CircuitBreaker("x", failure_threshold=2, recovery_timeout=1, half_open_max_calls=1, clock=clock)
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED  # not consecutive
    breaker.record_failure()
    clock.now = 1.0
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.now = 1.5
    assert not breaker.available()


def test_release_gives_back_a_half_open_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker("x", failure_threshold=1, recovery_timeout=1, half_open_max_calls=1, clock=clock)
    breaker.record_failure()
    clock.now = 2
    assert breaker.allow() and not breaker.allow()
    breaker.release()
    assert breaker.allow()
