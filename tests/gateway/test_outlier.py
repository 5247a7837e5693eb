"""Outlier detection: the pure tracker by table, then end to end on 127.0.0.1 (500s
retried and ejected, the ejection cap, visibility in status, metrics and the access
log), and the issue's reproduction of slow generations taking a cluster down."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from gateway.outlier import (
    Outcome,
    OutlierDetectionConfig,
    OutlierState,
    OutlierTracker,
    outcome_of_status,
)
from tests.conftest import wait_until
from tests.gateway.harness import fake_stack as stack

COMPLETION = {"model": "fake-model", "prompt": "Once upon a time", "max_tokens": 8}
S, F5, GW, N = Outcome.SUCCESS, Outcome.ERROR_5XX, Outcome.GATEWAY_FAILURE, Outcome.NEUTRAL


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tracker(n: int = 2, **kw: object) -> tuple[OutlierTracker, list[OutlierState], Clock]:
    clock = Clock()
    states = [OutlierState(clock) for _ in range(n)]
    config = OutlierDetectionConfig(**{"consecutive_5xx": 3, "consecutive_gateway_failure": 2,
                                       "base_ejection_time": 10.0, "max_ejection_time": 25.0, **kw})  # type: ignore[arg-type]
    return OutlierTracker(config, states, clock), states, clock


@pytest.mark.parametrize(("status", "outcome"), [(200, S), (404, N), (429, N), (500, F5), (501, F5),
                                                 (502, GW), (503, GW), (504, GW)])
def test_statuses_map_to_outcomes(status: int, outcome: Outcome) -> None:
    assert outcome_of_status(status) is outcome


@pytest.mark.parametrize(("outcomes", "ejected"), [
    ([F5, F5, F5], True),  # consecutive_5xx
    ([F5, F5, S, F5], False),  # a success resets the count
    ([GW, GW], True),  # consecutive_gateway_failure
    ([GW, F5, GW], True),  # gateway failures are 5xx too: 3 in a row
    ([GW, N, F5], False),  # a neutral outcome (4xx, 429) neither counts nor resets: two 5xx only
    ([N, N, N, N], False),
])
def test_consecutive_failures_eject(outcomes: list[Outcome], ejected: bool) -> None:
    t, (a, _), _ = tracker()
    results = [t.record(a, o) for o in outcomes]
    assert a.ejected() is ejected and any(results) is ejected


def test_ejection_grows_with_each_time_and_is_capped() -> None:
    t, (a, _), clock = tracker()
    durations = []
    for _ in range(4):
        assert t.record(a, GW) is False and t.record(a, GW) is True
        durations.append(a.remaining())
        clock.now += durations[-1] or 0.0
        assert not a.ejected() and a.five_xx == 0  # back, counts reset
    assert durations == [10.0, 20.0, 25.0, 25.0] and a.ejections == 4


@pytest.mark.parametrize(("n", "percent", "most"), [(1, 100, 0), (2, 50, 1), (3, 50, 1), (4, 50, 2),
                                                     (4, 100, 3), (10, 10, 1), (2, 0, 0)])
def test_never_more_than_max_ejection_percent_and_one_always_stays(n: int, percent: int, most: int) -> None:
    t, states, _ = tracker(n, max_ejection_percent=percent, consecutive_gateway_failure=1)
    for state in states:
        t.record(state, GW)
    assert sum(s.ejected() for s in states) == most


def test_disabled_detection_never_ejects() -> None:
    t, (a, _), _ = tracker(enabled=False)
    assert not any(t.record(a, GW) for _ in range(10)) and not a.ejected()


# --- end to end ------------------------------------------------------------------------------------

async def post(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.post(url + "/v1/completions", json=COMPLETION) as resp:
        return resp.status, await resp.read()


async def test_500s_are_retried_elsewhere_and_eject_the_endpoint_visibly(tmp_path: Path) -> None:
    ejecting = "\n    outlier_detection: {consecutive_5xx: 3, base_ejection_time: 30s}"
    async with stack(tmp_path, cluster=ejecting) as st, aiohttp.ClientSession() as session:
        st.backends["a"].status = 500  # /health still says 200, as vLLM's does on engine errors
        statuses = [(await post(session, st.url))[0] for _ in range(8)]
        assert statuses == [200] * 8  # every 500 was retried on b before a byte was sent
        assert len(st.backends["a"].requests) == 3  # ejected after its third 500: no traffic since
        endpoints = {e.id: e for e in st.state.clusters.all_endpoints()}
        assert all(e.breaker.state.value == "closed" for e in endpoints.values())
        async with session.get(st.url + "/kvgate/status") as resp:
            status = {e["id"]: e for e in (await resp.json())["endpoints"]}
        assert status["a"]["ejections"] == 1 and status["a"]["ejected_until"] is not None
        assert status["b"]["ejections"] == 0 and status["b"]["ejected_until"] is None
        async with session.get(st.url + "/metrics") as resp:
            metrics = await resp.text()
        assert 'kvgate_endpoint_ejected{endpoint="a"} 1.0' in metrics
        assert 'kvgate_endpoint_ejections_total{endpoint="a"} 1.0' in metrics
        assert 'kvgate_endpoint_ejected{endpoint="b"} 0.0' in metrics
        await wait_until(lambda: len(st.access_log()) == 8)
        assert [r.get("ejected_endpoint") for r in st.access_log()].count("a") == 1


async def test_a_500_on_the_final_attempt_is_relayed_as_is(tmp_path: Path) -> None:
    async with stack(tmp_path) as st, aiohttp.ClientSession() as session:
        for fake in st.backends.values():
            fake.status = 500
        status, body = await post(session, st.url)
        assert status == 500 and json.loads(body)["error"]["message"] == "forced"  # the backend's own body
        assert sum(len(f.requests) for f in st.backends.values()) == 2  # retried once (max_attempts: 2)


async def test_the_cluster_never_ejects_every_endpoint(tmp_path: Path) -> None:
    eager = "\n    outlier_detection: {consecutive_5xx: 1, consecutive_gateway_failure: 1}"
    async with stack(tmp_path, cluster=eager) as st, aiohttp.ClientSession() as session:
        for fake in st.backends.values():
            fake.status = 500
        for _ in range(6):
            assert (await post(session, st.url))[0] == 500
        assert sum(e.outlier.ejected() for e in st.state.clusters.all_endpoints()) == 1


async def test_slow_generations_leave_breakers_closed_and_the_cluster_serving(tmp_path: Path) -> None:
    """The issue's item 1, scaled down 10x: 12 concurrent 0.4 s non-streamed generations
    with `first_byte: 300ms` once timed out, ran again elsewhere and opened every breaker.
    Now `total` bounds them, every one is answered, and the next 20 small requests too."""
    async with stack(tmp_path, n=3, timeouts="connect: 500ms, first_byte: 300ms") as st, \
            aiohttp.ClientSession() as session:
        for fake in st.backends.values():
            fake.first_byte_delay = 0.4
        slow = await asyncio.gather(*(post(session, st.url) for _ in range(12)))
        assert [s for s, _ in slow] == [200] * 12
        assert sum(len(f.requests) for f in st.backends.values()) == 12  # no generation ran twice
        for fake in st.backends.values():
            fake.first_byte_delay = 0.0
        small = await asyncio.gather(*(post(session, st.url) for _ in range(20)))
        assert [s for s, _ in small] == [200] * 20
        endpoints = st.state.clusters.all_endpoints()
        assert all(e.breaker.state.value == "closed" and not e.outlier.ejected() for e in endpoints)
