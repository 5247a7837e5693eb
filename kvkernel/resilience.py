"""Resilience at the control-plane client boundary: retries and a circuit breaker.

`ResilientCaller.call(op)` runs one logical call to a dependency (the LMCache
controller, a remote `/tokenize`) through its breaker and tenacity retries:

- an open breaker raises `CircuitOpenError` at once: no request, never retried;
- transient errors only are retried (connect errors, timeouts and other httpx
  transport errors, HTTP 5xx), with exponential backoff and full jitter
  (each wait is uniform in [0, min(max_backoff, base_backoff * 2**(n-1))]);
- a 4xx, a malformed answer or any other error is never retried;
- `timeout` bounds the whole call, retries and backoff included;
- the breaker judges each *call*, not each attempt: one `record_failure()` when
  the call fails after its retries (or runs out of time), one `record_success()`
  when it gets any HTTP answer below 500 (a 4xx proves the dependency is up).
  So `failure_threshold: 5` means five failed calls in a row, whatever the
  retry count;
- cancellation (`CancelledError`) propagates at once and gives back a
  half-open trial slot without judging the dependency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from kvkernel.breaker import CircuitBreaker, CircuitBreakerConfig, CircuitOpenError
from kvkernel.decode import FieldError, Seconds

T = TypeVar("T")

__all__ = ["BreakerSettings", "CircuitOpenError", "DependencyDown", "ResilientCaller", "RetrySettings",
           "is_transient"]


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """`retry:` in YAML. `max_attempts` counts the first try (1 = no retry)."""

    max_attempts: int = 3
    base_backoff: Seconds = 0.1
    max_backoff: Seconds = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise FieldError("max_attempts", f"must be >= 1, got {self.max_attempts}")
        if self.max_backoff < self.base_backoff:
            raise FieldError("max_backoff", f"must be >= base_backoff ({self.base_backoff}s), got {self.max_backoff}s")


BreakerSettings = CircuitBreakerConfig  # `circuit_breaker:` in YAML, same shape as a cluster's


DEFAULT_RETRY = RetrySettings()


class DependencyDown(Exception):
    """The dependency failed transiently on every attempt, or did not answer in time."""


def is_transient(exc: BaseException) -> bool:
    """Connect errors, timeouts and other transport errors, and HTTP 5xx."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)


def describe(exc: BaseException) -> str:
    """A short, log-friendly reason for a failed attempt."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, httpx.TimeoutException):
        return f"timeout ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class ResilientCaller:
    """Breaker + retries for one dependency (see the module docstring for the contract)."""

    def __init__(self, breaker: CircuitBreaker, retry: RetrySettings = DEFAULT_RETRY,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.breaker = breaker
        self.retry = retry
        self._sleep = sleep
        self.retries = 0  # attempts beyond the first, over the caller's lifetime

    async def call(self, op: Callable[[], Awaitable[T]], *, timeout: float | None = None,
                   retry: bool = True) -> T:
        """Run `op` (one HTTP exchange that raises httpx errors, including
        `HTTPStatusError` for non-2xx) under the breaker, retries and `timeout`."""
        if not self.breaker.allow():
            raise CircuitOpenError(self.breaker.name)
        try:
            async with asyncio.timeout(timeout):
                result = await self._attempts(op, self.retry.max_attempts if retry else 1)
        except asyncio.CancelledError:
            self.breaker.release()
            raise
        except TimeoutError:
            self.breaker.record_failure()
            budget = f"{timeout * 1000:.0f} ms" if timeout is not None else "its time budget"
            raise DependencyDown(f"no answer within {budget}") from None
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code >= 500:
                self.breaker.record_failure()
                raise DependencyDown(describe(exc)) from exc
            self.breaker.record_success()
            raise
        except Exception as exc:
            self.breaker.record_failure()
            if is_transient(exc):
                raise DependencyDown(describe(exc)) from exc
            raise
        self.breaker.record_success()
        return result

    async def _attempts(self, op: Callable[[], Awaitable[T]], max_attempts: int) -> T:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(max_attempts),
            wait=wait_random_exponential(multiplier=self.retry.base_backoff, max=self.retry.max_backoff),
            retry=retry_if_exception(is_transient),
            sleep=self._sleep,
            before_sleep=self._count_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await op()
        raise AssertionError("unreachable: tenacity either returns or re-raises")  # pragma: no cover

    def _count_retry(self, state: RetryCallState) -> None:
        self.retries += 1
