"""Time-to-first-token model of one endpoint, learned online from the gateway's own
observations. Pure: no I/O, an injectable clock, table-tested.

    predicted TTFT = queue ahead + overhead + uncached tokens / prefill rate

- `SpeedLearner` fits `service = overhead + uncached * seconds_per_token` by
  recursive least squares with forgetting, starting from a prior (pseudo-samples
  of the configured prior rate and overhead), so a fleet of different engines (a
  CPU MLX daemon at ~450 tokens/s, a GPU vLLM at ~10k) is told apart within a few
  requests each. A sample's residual is clipped, so one queueing outlier cannot
  swing the fit.
- `PrefillQueue` models the endpoint's prefill as one serial server (how vLLM's
  scheduler and our simulator treat compute-bound prefill): a dispatched request
  extends `busy_until` by its predicted service; a first byte that arrives
  earlier or later than predicted shifts the requests behind it by the error;
  work that has run decays with the clock (nothing is held through decode).
- `EndpointModel` joins the two per endpoint and reads the evidence of streamed
  attempts still waiting for their first byte: the oldest one has been served
  for at least `now - max(its dispatch, the last first byte)`, a lower bound on
  the endpoint's time per token. An engine slower than believed is seen as soon
  as its first request is overdue, not only once a sample completes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MIN_SECONDS_PER_TOKEN = 1e-7  # 10M tokens/s: a floor that keeps the rate finite
NOISE_VARIANCE = 0.005 ** 2  # s^2: the spread of one TTFT sample around the model (~5 ms)


@dataclass(slots=True)
class SpeedLearner:
    prior_rate: float  # tokens/s
    prior_overhead: float  # s
    forgetting: float = 0.98
    samples: int = 0
    theta: list[float] = field(default_factory=list)  # [overhead s, seconds per token]
    p: list[list[float]] = field(default_factory=list)  # covariance

    def __post_init__(self) -> None:
        if not self.theta:
            self.theta = [self.prior_overhead, 1.0 / self.prior_rate]
            # Prior uncertainty relative to the samples' noise (RLS weighs the prior against
            # unit-variance samples, so both are scaled by NOISE_VARIANCE): overhead +- ~20 ms,
            # seconds per token +- 3x the prior's (engines differ by orders of magnitude).
            self.p = [[0.02 ** 2 / NOISE_VARIANCE, 0.0],
                      [0.0, (3.0 / self.prior_rate) ** 2 / NOISE_VARIANCE]]

    @property
    def overhead(self) -> float:
        return max(0.0, self.theta[0])

    @property
    def seconds_per_token(self) -> float:
        return max(MIN_SECONDS_PER_TOKEN, self.theta[1])

    @property
    def rate(self) -> float:
        return 1.0 / self.seconds_per_token

    def predict(self, uncached: int) -> float:
        return self.overhead + max(0, uncached) * self.seconds_per_token

    def observe(self, uncached: int, service: float) -> None:
        """One sample: `service` seconds of prefill for `uncached` tokens."""
        if not math.isfinite(service) or service < 0 or uncached < 0:
            return
        x = (1.0, float(uncached))
        predicted = self.theta[0] + x[1] * self.theta[1]
        bound = max(0.05, 4.0 * abs(predicted))
        residual = max(-bound, min(bound, service - predicted))
        p, lam = self.p, self.forgetting
        px = (p[0][0] * x[0] + p[0][1] * x[1], p[1][0] * x[0] + p[1][1] * x[1])
        denom = lam + x[0] * px[0] + x[1] * px[1]
        k = (px[0] / denom, px[1] / denom)
        self.theta = [self.theta[0] + k[0] * residual, self.theta[1] + k[1] * residual]
        xp = (x[0] * p[0][0] + x[1] * p[1][0], x[0] * p[0][1] + x[1] * p[1][1])
        self.p = [[(p[i][j] - k[i] * xp[j]) / lam for j in range(2)] for i in range(2)]
        self.theta[1] = max(MIN_SECONDS_PER_TOKEN, self.theta[1])
        self.samples += 1


@dataclass(slots=True)
class PrefillQueue:
    clock: Callable[[], float] = time.monotonic
    busy_until: float = 0.0
    pending: int = 0  # dispatched requests whose first byte has not arrived
    last_first_byte: float = 0.0

    def ahead(self, now: float | None = None) -> float:
        """Seconds of prefill queued ahead of a request dispatched now."""
        now = self.clock() if now is None else now
        return max(0.0, self.busy_until - now) if self.pending else 0.0

    def dispatch(self, service: float) -> float:
        """Queue a request of predicted `service` seconds; its predicted prefill end."""
        now = self.clock()
        self.busy_until = max(now, self.busy_until if self.pending else now) + service
        self.pending += 1
        return self.busy_until

    def first_byte(self, predicted_end: float, dispatched_at: float) -> float:
        """The request's first byte arrived now; returns its observed service time
        (from when it could start: its dispatch, or the previous first byte)."""
        now = self.clock()
        started = max(dispatched_at, self.last_first_byte)
        self.last_first_byte = now
        self.leave()
        self.busy_until = max(now, self.busy_until + (now - predicted_end)) if self.pending else now
        return now - started

    def abandon(self, remaining: float) -> None:
        """A dispatched request left before its first byte: its remaining work goes."""
        self.leave()
        now = self.clock()
        self.busy_until = max(now, self.busy_until - max(0.0, remaining)) if self.pending else now

    def leave(self) -> None:
        """The request is out of the prefill queue; its predicted work stays booked (it
        decays with the clock)."""
        self.pending = max(0, self.pending - 1)


@dataclass(slots=True, eq=False)
class Attempt:
    """One dispatched attempt, from dispatch to release."""

    endpoint: str
    uncached: int
    service: float  # predicted prefill seconds
    predicted_ttft: float
    dispatched_at: float
    predicted_end: float
    stream: bool
    first_byte_seen: bool = False
    observed_service: float | None = None  # streams only
    foreign_load: bool = False  # the engine showed load this gateway did not send (at dispatch or first byte)
    engine_service: float | None = None  # prefill start (the engine's KV event) -> first byte


class EndpointModel:
    """What the picker knows of one endpoint's speed and prefill queue."""

    __slots__ = ("speed", "queue", "waiting", "errors", "abs_error")

    def __init__(self, prior_rate: float, prior_overhead: float, forgetting: float,
                 clock: Callable[[], float]) -> None:
        self.speed = SpeedLearner(prior_rate, prior_overhead, forgetting)
        self.queue = PrefillQueue(clock)
        self.waiting: list[Attempt] = []  # streamed attempts without a first byte, in dispatch order
        self.errors = 0
        self.abs_error = 0.0  # running mean of |actual - predicted| TTFT, s

    def _head_served(self, now: float) -> float:
        """How long the oldest waiting stream has been in service (it could start at its
        dispatch or at the previous first byte, whichever came later). Needs `waiting`."""
        return now - max(self.waiting[0].dispatched_at, self.queue.last_first_byte)

    def seconds_per_token(self, now: float, overdue_proves: bool = True) -> float:
        """The learned time per token, raised to what the oldest overdue stream proves (unless
        `overdue_proves` is False: the engine is busy with work this gateway did not send, e.g.
        another replica's, which explains the delay as well as a slower engine would)."""
        spt = self.speed.seconds_per_token
        if self.waiting and overdue_proves:
            head, served = self.waiting[0], self._head_served(now)
            if head.uncached > 0 and served > head.service:
                spt = max(spt, (served - self.speed.overhead) / head.uncached)
        return spt

    def predict(self, uncached: int, now: float, overdue_proves: bool = True) -> float:
        return self.speed.overhead + max(0, uncached) * self.seconds_per_token(now, overdue_proves)

    def ahead(self, now: float, overdue_proves: bool = True) -> float:
        """Prefill seconds queued ahead of a new request: the booked queue, or, when the
        streams waiting here prove the engine slower, their work at the proven speed."""
        booked = self.queue.ahead(now)
        if not self.waiting or not overdue_proves:
            return booked
        spt = self.seconds_per_token(now)
        proven = sum(self.speed.overhead + a.uncached * spt for a in self.waiting) - self._head_served(now)
        return max(booked, proven)

    def dispatch(self, attempt: Attempt) -> None:
        if attempt.stream:
            self.waiting.append(attempt)

    def settle(self, attempt: Attempt) -> None:
        if attempt in self.waiting:
            self.waiting.remove(attempt)

    def record_error(self, actual: float, predicted: float) -> None:
        self.errors += 1
        self.abs_error += (abs(actual - predicted) - self.abs_error) / min(self.errors, 100)
