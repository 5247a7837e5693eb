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
