"""Outlier detection, Envoy-style: passive ejection of endpoints that keep failing.

Each endpoint counts consecutive 5xx answers (500 included, gateway failures too) and
consecutive gateway failures (connect errors, 502/503/504, a timeout before the
response head). When either count reaches its threshold the endpoint is ejected for
`base_ejection_time * times ejected` (capped at `max_ejection_time`), unless that
would eject more than `max_ejection_percent` of the cluster; at least one endpoint
always stays. Any success resets both counts. An ejected endpoint is not eligible
until its time is up; it then returns with its counts reset.

Decide purely, execute separately: `OutlierTracker.record` is a small state machine
with an injectable clock, no I/O. Imports only the kernel.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvkernel.decode import FieldError, Seconds


class Outcome(enum.Enum):
    SUCCESS = "success"
    ERROR_5XX = "5xx"  # an answer 500..599 that is not a gateway failure
    GATEWAY_FAILURE = "gateway_failure"  # connect error, 502/503/504, timeout before the head
    NEUTRAL = "neutral"  # says nothing of the endpoint (4xx, client gone, timeout after the head)


GATEWAY_STATUSES = frozenset({502, 503, 504})


def outcome_of_status(status: int) -> Outcome:
    if status in GATEWAY_STATUSES:
        return Outcome.GATEWAY_FAILURE
    if 500 <= status <= 599:
        return Outcome.ERROR_5XX
    return Outcome.SUCCESS if status < 400 else Outcome.NEUTRAL


@dataclass(frozen=True, slots=True)
class OutlierDetectionConfig:
    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    base_ejection_time: Seconds = 30.0
    max_ejection_time: Seconds = 300.0
    max_ejection_percent: int = 50
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("consecutive_5xx", "consecutive_gateway_failure"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.base_ejection_time <= 0:
            raise FieldError("base_ejection_time", "must be > 0")
        if self.max_ejection_time < self.base_ejection_time:
            raise FieldError("max_ejection_time", "must be >= base_ejection_time")
        if not 0 <= self.max_ejection_percent <= 100:
            raise FieldError("max_ejection_percent", f"must be in 0..100, got {self.max_ejection_percent}")


class OutlierState:
    """One endpoint's outlier bookkeeping."""

    __slots__ = ("five_xx", "gateway", "ejected_until", "ejections", "_clock")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.five_xx = 0
        self.gateway = 0
        self.ejected_until: float | None = None  # monotonic time, None when not ejected
        self.ejections = 0
        self._clock = clock

    def ejected(self) -> bool:
        until = self.ejected_until
        if until is None:
            return False
        if self._clock() >= until:
            self.ejected_until = None
            self.five_xx = self.gateway = 0
            return False
        return True

    def remaining(self) -> float | None:
        """Seconds until the ejection ends, None when not ejected."""
        return self.ejected_until - self._clock() if self.ejected() and self.ejected_until is not None else None


class OutlierTracker:
    """The outlier detector of one cluster: `record` an attempt's outcome at an endpoint;
    returns True when that outcome ejected it."""

    def __init__(self, config: OutlierDetectionConfig, states: Sequence[OutlierState],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._states = states
        self._clock = clock

    def record(self, state: OutlierState, outcome: Outcome) -> bool:
        if outcome is Outcome.NEUTRAL or not self.config.enabled:
            return False
        if outcome is Outcome.SUCCESS:
            state.five_xx = state.gateway = 0
            return False
        state.five_xx += 1
        if outcome is Outcome.GATEWAY_FAILURE:
            state.gateway += 1
        tripped = (state.five_xx >= self.config.consecutive_5xx
                   or state.gateway >= self.config.consecutive_gateway_failure)
        if not tripped or state.ejected() or not self._may_eject():
            return False
        state.ejections += 1
        duration = min(self.config.base_ejection_time * state.ejections, self.config.max_ejection_time)
        state.ejected_until = self._clock() + duration
        state.five_xx = state.gateway = 0
        return True

    def _may_eject(self) -> bool:
        """One more ejection keeps within max_ejection_percent and leaves one endpoint in."""
        total = len(self._states)
        ejected = sum(1 for s in self._states if s.ejected())
        allowed = min(total - 1, math.floor(total * self.config.max_ejection_percent / 100))
        return ejected + 1 <= allowed
