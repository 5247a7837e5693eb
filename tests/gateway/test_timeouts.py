"""Upstream timeouts and failures after the head: what each failure means (pure table),
and a stream that goes silent or breaks mid-way, end to end on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from gateway.attempts import verdict_of_error, verdict_of_status
from gateway.outlier import Outcome
from gateway.proxy import IdleWatch
from tests.conftest import wait_until
from tests.gateway.harness import fake_stack as stack

STREAM = {"model": "fake-model", "prompt": "Once upon a time", "max_tokens": 8, "stream": True}


@pytest.mark.parametrize(("exc", "method", "status", "retry", "breaker"), [
    (aiohttp.ConnectionTimeoutError(), "POST", 504, True, True),  # never reached the backend
    (aiohttp.ClientConnectorError.__new__(aiohttp.ClientConnectorError), "POST", 502, True, True),
    (TimeoutError(), "POST", 504, False, False),  # accepted, still working: not run twice
    (TimeoutError(), "GET", 504, True, False),  # idempotent: may be asked elsewhere
    (aiohttp.ServerDisconnectedError(), "POST", 502, True, True),
])
def test_failures_before_the_head(exc: BaseException, method: str, status: int, retry: bool, breaker: bool) -> None:
    verdict = verdict_of_error(exc, "a", method)
    assert (verdict.status, verdict.retry, verdict.breaker) == (status, retry, breaker)
    assert verdict.outcome is Outcome.GATEWAY_FAILURE


@pytest.mark.parametrize(("status", "breaker", "outcome"), [
    (429, False, Outcome.NEUTRAL), (500, False, Outcome.ERROR_5XX), (502, True, Outcome.GATEWAY_FAILURE),
    (503, False, Outcome.GATEWAY_FAILURE), (504, True, Outcome.GATEWAY_FAILURE)])
def test_retried_statuses(status: int, breaker: bool, outcome: Outcome) -> None:
    verdict = verdict_of_status(status, "a")
    assert verdict is not None and verdict.retry and verdict.breaker is breaker and verdict.outcome is outcome


@pytest.mark.parametrize("status", [200, 400, 401, 404, 413, 422])
def test_other_statuses_are_relayed(status: int) -> None:
    assert verdict_of_status(status, "a") is None


async def test_a_silent_stream_ends_with_an_sse_error_and_is_logged_as_failed(tmp_path: Path) -> None:
    async with stack(tmp_path, n=1, timeouts="connect: 500ms, first_byte: 5s, idle: 200ms") as st, \
            aiohttp.ClientSession() as session:
        st.backends["a"].stream_gate = asyncio.Event()  # holds the stream after its first chunk
        async with session.post(st.url + "/v1/completions", json=STREAM) as resp:
            assert resp.status == 200
            body = await resp.read()
        events = [e for e in body.decode().split("\n\n") if e.strip()]
        assert events[0].startswith("data: {") and "tok0" in events[0]
        error = json.loads(events[-1].removeprefix("data: "))["error"]
        assert error["code"] == "upstream_timeout" and set(error) == {"message", "type", "param", "code"}
        await wait_until(lambda: len(st.access_log()) == 1)
        record = st.access_log()[0]
        assert record["status"] == 504 and "went silent" in record["error"]
        async with session.get(st.url + "/metrics") as resp:
            assert 'kvgate_requests_total{cluster="llm",endpoint="a",status="504"} 1.0' in await resp.text()
        endpoint = st.state.clusters["llm"].endpoint("a")
        assert endpoint is not None and endpoint.breaker.state.value == "closed"
        st.backends["a"].stream_gate.set()


class _Timer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class _Clock:
    """A stand-in loop for `IdleWatch`: a settable time and the timers it was asked for."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[_Timer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> _Timer:
        self.timers.append(_Timer(when, callback))
        return self.timers[-1]

    def fire(self) -> None:
        """Run the last armed timer's callback at its time."""
        timer = self.timers[-1]
        assert not timer.cancelled
        self.now = timer.when
        timer.callback()


class _Budget:
    def __init__(self) -> None:
        self.expired_at: float | None = None

    def reschedule(self, when: float | None) -> None:
        self.expired_at = when


def test_an_idle_watch_arms_one_timer_and_rearms_it_only_when_chunks_came() -> None:
    clock, budget = _Clock(), _Budget()
    watch = IdleWatch(clock, budget, 10.0)  # type: ignore[arg-type]
    assert [t.when for t in clock.timers] == [10.0]
    for t in (1.0, 2.0, 7.0):  # chunks: no timer per chunk
        clock.now = t
        watch.touch()
    assert len(clock.timers) == 1
    clock.fire()  # at 10: the last chunk came at 7, so the stream is not idle yet
    assert budget.expired_at is None and [t.when for t in clock.timers] == [10.0, 17.0]
    clock.fire()  # at 17: nothing since 7
    assert budget.expired_at == 17.0
    watch.cancel()  # nothing armed any more: a no-op
    assert not any(t.cancelled for t in clock.timers)


def test_an_idle_watch_cancels_its_timer_when_the_stream_ends() -> None:
    clock = _Clock()
    IdleWatch(clock, _Budget(), 10.0).cancel()  # type: ignore[arg-type]
    assert [t.cancelled for t in clock.timers] == [True]


def test_an_idle_watch_does_not_count_a_write_to_a_slow_client() -> None:
    clock, budget = _Clock(), _Budget()
    watch = IdleWatch(clock, budget, 10.0)  # type: ignore[arg-type]
    clock.now = 1.0
    watch.writing()  # the client reads slowly: the write waits
    clock.fire()  # at 10: still writing, not idle; look again in 10 s
    assert budget.expired_at is None and clock.timers[-1].when == 20.0
    clock.now = 15.0
    watch.touch()  # the write is done: from now on the upstream's silence counts
    clock.fire()  # at 20: a chunk 5 s ago
    assert budget.expired_at is None and clock.timers[-1].when == 25.0
    clock.fire()
    assert budget.expired_at == 25.0

