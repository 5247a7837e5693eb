"""A circuit breaker (closed / open / half-open) with an injectable clock.

Used per upstream endpoint by the proxy and per dependency by control-plane
clients. A leaf module: imports nothing else from the project.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvkernel.decode import FieldError, Seconds


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpenError(Exception):
    """Raised by callers when a breaker refuses a call; never retried."""

    def __init__(self, name: str) -> None:
        super().__init__(f"circuit breaker {name!r} is open")
        self.name = name


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failures; after `recovery_timeout`
    lets up to `half_open_max_calls` trial calls through; one success closes it,
    one failure re-opens it.

    `allow()` reserves a call (a half-open slot); every allowed call must end with
    `record_success()` or `record_failure()` (or `release()` if it was not a test of
    the dependency, e.g. the client gave up).
    """

    def __init__(self, name: str, failure_threshold: int = 5, recovery_timeout: float = 10.0,
                 half_open_max_calls: int = 2, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, BreakerState], None] | None = None) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self.half_open_max_calls = half_open_max_calls
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._half_open_calls = 0

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.recovery_timeout:
            self._set(BreakerState.HALF_OPEN)
            self._half_open_calls = 0
        return self._state

    def available(self) -> bool:
        """Would `allow()` succeed now? Does not reserve anything."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and self._half_open_calls < self.half_open_max_calls

    def allow(self) -> bool:
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and self._half_open_calls < self.half_open_max_calls:
            self._half_open_calls += 1
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        if self._state is not BreakerState.CLOSED:
            self._set(BreakerState.CLOSED)
        self._half_open_calls = 0

    def record_failure(self) -> None:
        state = self.state
        self._failures += 1
        if state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
            self._half_open_calls = 0
            self._set(BreakerState.OPEN)

    def release(self) -> None:
        """Give back a half-open slot without judging the dependency."""
        if self._state is BreakerState.HALF_OPEN and self._half_open_calls > 0:
            self._half_open_calls -= 1

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(self.name, state)


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    failure_threshold: int = 5
    recovery_timeout: Seconds = 10.0
    half_open_max_calls: int = 2

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise FieldError("failure_threshold", f"must be >= 1, got {self.failure_threshold}")
        if self.half_open_max_calls < 1:
            raise FieldError("half_open_max_calls", f"must be >= 1, got {self.half_open_max_calls}")

    def build(self, name: str, clock: Callable[[], float] = time.monotonic,
              on_change: Callable[[str, BreakerState], None] | None = None) -> CircuitBreaker:
        return CircuitBreaker(name, self.failure_threshold, self.recovery_timeout, self.half_open_max_calls,
                              clock=clock, on_change=on_change)
