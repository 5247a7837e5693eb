"""LMCacheClient failure modes: retries, timeouts, 4xx, breaker states with an injected clock, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import respx

from filters.lmcache_client import (
    LMCacheClient,
    LMCacheError,
    LMCacheRequestError,
    LMCacheUnavailable,
    RetrySettings,
)
from kvkernel.breaker import BreakerState, CircuitBreaker, CircuitOpenError

BASE = "http://lmcache.test:9000"
OK = {"event_id": "e", "layout_info": {"a": ["LocalCPUBackend", 256]}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sleeps:
    """Records backoff waits instead of sleeping."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False) as mock:
        yield mock


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


RETRY = RetrySettings(max_attempts=3, base_backoff=0.1, max_backoff=0.15)


def make(http: httpx.AsyncClient, *, threshold: int = 5, recovery: float = 10.0, half_open: int = 1,
         retry: RetrySettings = RETRY,
         clock: Clock | None = None, sleeps: Sleeps | None = None) -> LMCacheClient:
    breaker = CircuitBreaker("lmcache", threshold, recovery, half_open, clock=clock or Clock())
    return LMCacheClient(BASE, http, retry=retry, breaker=breaker, sleep=sleeps or Sleeps())


async def test_5xx_then_success_retries_with_bounded_jittered_backoff(http: httpx.AsyncClient,
                                                                      router: respx.MockRouter) -> None:
    route = router.post("/lookup").mock(side_effect=[httpx.Response(500, json={"detail": "boom"}),
                                                     httpx.Response(503), httpx.Response(200, json=OK)])
    sleeps = Sleeps()
    client = make(http, threshold=1, sleeps=sleeps)
    result = await client.lookup([1, 2])
    assert result.layout == {"a": ("LocalCPUBackend", 256)}
    assert route.call_count == 3
    assert len(sleeps.waits) == 2 and client.retries == 2
    assert 0 <= sleeps.waits[0] <= 0.1 and 0 <= sleeps.waits[1] <= 0.15  # base * 2**(n-1), capped
    assert client.breaker.state is BreakerState.CLOSED


async def test_backoff_is_jittered(http: httpx.AsyncClient, router: respx.MockRouter) -> None:
    router.post("/clear").respond(500)
    sleeps = Sleeps()
    client = make(http, threshold=100, retry=RetrySettings(max_attempts=2, base_backoff=1.0, max_backoff=1.0),
                  sleeps=sleeps)
    for _ in range(20):
        with pytest.raises(LMCacheUnavailable):
            await client.clear("a", "L")
    assert len(sleeps.waits) == 20 and len(set(sleeps.waits)) > 1
    assert all(0 <= w <= 1.0 for w in sleeps.waits)


@pytest.mark.parametrize("failure", [httpx.ConnectError("connection refused"), httpx.ReadTimeout("slow"),
                                     httpx.ConnectTimeout("slow"), httpx.RemoteProtocolError("reset"),
                                     httpx.Response(502)])
async def test_transient_errors_are_retried_then_unavailable(http: httpx.AsyncClient, router: respx.MockRouter,
                                                             failure: Exception | httpx.Response) -> None:
    route = router.post("/pin").mock(side_effect=[failure] * 3)
    client = make(http)
    with pytest.raises(LMCacheUnavailable, match="/pin"):
        await client.pin("a", "LocalCPUBackend", [1])
    assert route.call_count == 3


@pytest.mark.parametrize("status", [400, 404, 409, 422])
async def test_4xx_is_never_retried_and_keeps_breaker_closed(http: httpx.AsyncClient, router: respx.MockRouter,
                                                             status: int) -> None:
    route = router.post("/lookup").respond(status, json={"detail": "bad tokens"})
    client = make(http, threshold=1)
    with pytest.raises(LMCacheRequestError) as info:
        await client.lookup([1])
    assert route.call_count == 1
    assert info.value.status == status and info.value.detail == "bad tokens"
    assert client.breaker.state is BreakerState.CLOSED


async def test_lookup_retry_false_makes_one_attempt(http: httpx.AsyncClient, router: respx.MockRouter) -> None:
    route = router.post("/lookup").respond(503)
    with pytest.raises(LMCacheUnavailable):
        await make(http).lookup([1], retry=False)
    assert route.call_count == 1


async def test_lookup_timeout_bounds_the_whole_call(http: httpx.AsyncClient, router: respx.MockRouter) -> None:
    attempts = 0

    async def hang(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    router.post("/lookup").mock(side_effect=hang)
    client = make(http, threshold=1)
    with pytest.raises(LMCacheUnavailable, match="no answer within 30 ms"):
        await client.lookup([1], timeout=0.03)
    assert attempts == 1
    assert client.breaker.state is BreakerState.OPEN  # a slow controller counts as a failure


async def test_timeout_covers_backoff_too(http: httpx.AsyncClient, router: respx.MockRouter) -> None:
    router.post("/lookup").respond(500)
    breaker = CircuitBreaker("lmcache", 5, 10.0, 1)
    # real sleeps: the backoff (>= 10 s) is cut short by the 30 ms budget
    client = LMCacheClient(BASE, http, retry=RetrySettings(5, 10.0, 10.0), breaker=breaker)
    with pytest.raises(LMCacheUnavailable, match="no answer within 30 ms"):
        await asyncio.wait_for(client.lookup([1], timeout=0.03), timeout=5)


async def test_breaker_counts_one_failure_per_call_then_opens(http: httpx.AsyncClient,
                                                              router: respx.MockRouter) -> None:
    route = router.post("/lookup").respond(500)
    client = make(http, threshold=2)
    with pytest.raises(LMCacheUnavailable):
        await client.lookup([1])
    assert client.breaker.state is BreakerState.CLOSED  # 3 attempts, but one failed call
    with pytest.raises(LMCacheUnavailable):
        await client.lookup([1])
    assert client.breaker.state is BreakerState.OPEN
    assert route.call_count == 6
    with pytest.raises(CircuitOpenError):
        await client.lookup([1])
    assert route.call_count == 6  # an open breaker sends nothing and is never retried


async def test_open_breaker_rejects_every_call_kind(http: httpx.AsyncClient, router: respx.MockRouter) -> None:
    router.post("/lookup").respond(500)
    evict = router.post("/evict").respond(404)
    client = make(http, threshold=1)
    with pytest.raises(LMCacheUnavailable):
        await client.lookup([1])
    with pytest.raises(CircuitOpenError):
        await client.evict("a", [1])
    with pytest.raises(CircuitOpenError):
        await client.health("a")
    assert not evict.called


async def test_half_open_recovery_closes_breaker(http: httpx.AsyncClient, router: respx.MockRouter) -> None:
    route = router.post("/lookup").mock(side_effect=[httpx.Response(500), httpx.Response(200, json=OK)])
    clock = Clock()
    client = make(http, threshold=1, recovery=10.0, retry=RetrySettings(max_attempts=1), clock=clock)
    with pytest.raises(LMCacheUnavailable):
        await client.lookup([1])
    clock.now += 9.9
    with pytest.raises(CircuitOpenError):
        await client.lookup([1])
    clock.now += 0.1
    assert client.breaker.state is BreakerState.HALF_OPEN
    assert (await client.lookup([1])).layout == {"a": ("LocalCPUBackend", 256)}
    assert client.breaker.state is BreakerState.CLOSED
    assert route.call_count == 2


async def test_half_open_failure_reopens(http: httpx.AsyncClient, router: respx.MockRouter) -> None:
    route = router.post("/lookup").respond(500)
    clock = Clock()
    client = make(http, threshold=1, recovery=5.0, retry=RetrySettings(max_attempts=1), clock=clock)
    with pytest.raises(LMCacheUnavailable):
        await client.lookup([1])
    clock.now += 5.0
    with pytest.raises(LMCacheUnavailable):
        await client.lookup([1])  # the trial call fails
    assert client.breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError):
        await client.lookup([1])
    assert route.call_count == 2


async def test_half_open_limits_concurrent_trials(http: httpx.AsyncClient, router: respx.MockRouter) -> None:
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow_ok(request: httpx.Request) -> httpx.Response:
        entered.set()
        await release.wait()
        return httpx.Response(200, json=OK)

    router.post("/lookup").mock(side_effect=[httpx.Response(500), slow_ok])
    clock = Clock()
    client = make(http, threshold=1, recovery=1.0, half_open=1, retry=RetrySettings(max_attempts=1), clock=clock)
    with pytest.raises(LMCacheUnavailable):
        await client.lookup([1])
    clock.now += 1.0
    trial = asyncio.create_task(client.lookup([1]))
    await entered.wait()
    with pytest.raises(CircuitOpenError):
        await client.lookup([1])  # the only half-open slot is taken
    release.set()
    assert (await trial).layout
    assert client.breaker.state is BreakerState.CLOSED


async def test_cancellation_propagates_and_releases_half_open_slot(http: httpx.AsyncClient,
                                                                   router: respx.MockRouter) -> None:
    entered = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    route = router.post("/lookup").mock(side_effect=[httpx.Response(500), hang, httpx.Response(200, json=OK)])
    clock = Clock()
    client = make(http, threshold=1, recovery=1.0, half_open=1, retry=RetrySettings(max_attempts=1), clock=clock)
    with pytest.raises(LMCacheUnavailable):
        await client.lookup([1])
    clock.now += 1.0
    task = asyncio.create_task(client.lookup([1]))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client.breaker.state is BreakerState.HALF_OPEN  # cancellation judged nothing
    assert client.breaker.available()  # ... and gave the slot back
    assert (await client.lookup([1])).layout
    assert client.breaker.state is BreakerState.CLOSED
    assert route.call_count == 2  # respx records the cancelled exchange as no call


async def test_cancellation_during_backoff_is_not_retried(http: httpx.AsyncClient, router: respx.MockRouter) -> None:
    route = router.post("/lookup").respond(500)
    sleeping = asyncio.Event()

    async def sleep_forever(_: float) -> None:
        sleeping.set()
        await asyncio.Event().wait()

    client = LMCacheClient(BASE, http, sleep=sleep_forever, breaker=CircuitBreaker("lmcache", 1))
    task = asyncio.create_task(client.lookup([1]))
    await sleeping.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert route.call_count == 1
    assert client.breaker.state is BreakerState.CLOSED  # not counted as a failure


async def test_non_json_error_body_detail(http: httpx.AsyncClient, router: respx.MockRouter) -> None:
    router.post("/clear").respond(400, text="plain words")
    with pytest.raises(LMCacheRequestError, match="plain words"):
        await make(http).clear("a", "L")


async def test_every_error_is_an_lmcache_error(http: httpx.AsyncClient, router: respx.MockRouter) -> None:
    router.post("/clear").mock(
        side_effect=[httpx.Response(400), httpx.ConnectError("x"), httpx.Response(200, text="?")])
    client = make(http, retry=RetrySettings(max_attempts=1))
    for _ in range(3):
        with pytest.raises(LMCacheError):
            await client.clear("a", "L")
