"""The fault battery: one of two backends misbehaves in one way; 20 requests through a
live gateway on 127.0.0.1. Each is answered within a bound; faults that allow it are
failed over before the first byte (every answer a 200); the breaker and outlier
detection take the faulty endpoint out exactly when they should, and the healthy
one is never touched."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from tests.gateway.harness import Stack, fake_stack

COMPLETION = {"model": "fake-model", "prompt": "Once upon a time", "max_tokens": 8}


async def _break(st: Stack, fault: str) -> None:
    fake = st.backends["a"]
    if fault == "refused":
        await st.servers["a"].close()
    elif fault == "hang":
        fake.first_byte_delay = 5.0  # beyond `total`
    else:
        fake.status = int(fault)


# fault -> (statuses clients may see, breaker of "a" may open, "a" ends out of rotation)
FAULTS = {
    "500": ({200}, False, True),  # retried; ejected after 5 consecutive 5xx
    "502": ({200}, True, True),  # retried; breaker (3) or ejection
    "503": ({200}, False, True),  # backpressure: retried, no breaker; ejected as gateway failures
    "429": ({200}, False, False),  # backpressure: retried, nothing counts
    "refused": ({200}, True, True),  # connect errors: retried, breaker/health take it out
    "hang": ({200, 504}, False, True),  # accepted then silent: 504, not run twice, ejected
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_one_faulty_backend(tmp_path: Path, fault: str) -> None:
    allowed, breaker_may_open, taken_out = FAULTS[fault]
    async with fake_stack(tmp_path, timeouts="connect: 500ms, first_byte: 300ms, total: 300ms") as st, \
            aiohttp.ClientSession() as session:
        await _break(st, fault)
        statuses = []
        started = time.monotonic()
        for _ in range(20):
            async with asyncio.timeout(5):  # nothing hangs
                async with session.post(st.url + "/v1/completions", json=COMPLETION) as resp:
                    await resp.read()
                    statuses.append(resp.status)
        assert set(statuses) <= allowed, statuses
        assert time.monotonic() - started < 20
        a, b = (st.state.clusters["llm"].endpoint(e) for e in ("a", "b"))
        assert a is not None and b is not None
        assert b.breaker.state.value == "closed" and not b.outlier.ejected() and b.healthy
        if not breaker_may_open:
            assert a.breaker.state.value == "closed"
        assert a.eligible() is (not taken_out)
        if fault == "hang":
            assert len(st.backends["a"].requests) + len(st.backends["b"].requests) == 20  # none ran twice
