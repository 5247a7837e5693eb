"""The LMCache client over the gateway's aiohttp session (the request path's cheap
transport): the same answers, errors, retries and breaker as over httpx, against a
real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from filters.lmcache_client import LMCacheClient, LMCacheRequestError, LMCacheUnavailable
from kvkernel.breaker import CircuitBreaker, CircuitOpenError
from kvkernel.resilience import RetrySettings
from testbed.procs import free_port


class Controller:
    def __init__(self) -> None:
        self.answers: list[tuple[int, Any]] = []
        self.hang = False
        self.calls = 0

    async def lookup(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = await request.json()
        if self.hang:
            await asyncio.sleep(10)
        status, payload = self.answers.pop(0) if self.answers else (
            200, {"event_id": "e1", "layout_info": {"inst-a": ["LocalCPUBackend", len(body["tokens"])]}})
        return web.json_response(payload, status=status)


@pytest.fixture
async def controller() -> AsyncIterator[tuple[Controller, str]]:
    fake = Controller()
    app = web.Application()
    app.router.add_post("/lookup", fake.lookup)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield fake, f"http://127.0.0.1:{server.port}"
    await server.close()


async def no_sleep(_: float) -> None:
    return None


def client(url: str, session: aiohttp.ClientSession, http: httpx.AsyncClient, **kw: Any) -> LMCacheClient:
    return LMCacheClient(url, http, session=session, retry=RetrySettings(max_attempts=3), sleep=no_sleep,
                         request_timeout=0.5, **kw)


async def test_answers_and_errors_match_the_httpx_transport(controller: tuple[Controller, str]) -> None:
    fake, url = controller
    async with aiohttp.ClientSession() as session, httpx.AsyncClient() as http:
        lmcache = client(url, session, http)
        result = await lmcache.lookup(list(range(300)))
        assert result.layout == {"inst-a": ("LocalCPUBackend", 300)}
        fake.answers = [(500, {"detail": "boom"}), (200, {"event_id": "e", "layout_info": {}})]
        assert (await lmcache.lookup([1, 2])).layout == {}  # a 500 is retried
        fake.answers = [(404, {"detail": "Not Found"})]
        with pytest.raises(LMCacheRequestError) as err:
            await lmcache.lookup([1])
        assert err.value.status == 404 and "Not Found" in err.value.detail


async def test_timeouts_and_refused_connections_are_unavailable_and_open_the_breaker(
        controller: tuple[Controller, str]) -> None:
    fake, url = controller
    fake.hang = True
    async with aiohttp.ClientSession() as session, httpx.AsyncClient() as http:
        breaker = CircuitBreaker("lmcache", failure_threshold=2, recovery_timeout=60, half_open_max_calls=1)
        lmcache = client(url, session, http, breaker=breaker)
        with pytest.raises(LMCacheUnavailable):
            await lmcache.lookup([1], timeout=0.2, retry=False)
        refused = client(f"http://127.0.0.1:{free_port()}", session, http, breaker=breaker)
        with pytest.raises(LMCacheUnavailable):
            await refused.lookup([1])
        with pytest.raises(CircuitOpenError):
            await lmcache.lookup([1])
