"""Control calls to one LMCache instance never overlap. A real aiohttp controller on
127.0.0.1 answers 500 when two calls to the same instance are in flight at once, as
the real controller 0.5.6 does (4 concurrent `/clear` -> 500 500 200 200)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from filters.lmcache_client import LMCacheClient, RetrySettings


@dataclass
class StrictController:
    inflight: Counter[str] = field(default_factory=Counter)
    overlaps: int = 0
    most_at_once: int = 0  # across instances: calls to different instances may overlap
    calls: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if request.path == "/lookup":
            return web.json_response({"event_id": "e", "layout_info": {}})
        instances = [body["old_position"][0], body["new_position"][0]] if "old_position" in body \
            else [body["instance_id"]]
        if any(self.inflight[i] for i in instances):
            self.overlaps += 1
            return web.json_response({"detail": "concurrent call"}, status=500)
        for i in instances:
            self.inflight[i] += 1
        self.calls += 1
        self.most_at_once = max(self.most_at_once, sum(self.inflight.values()))
        try:
            await asyncio.sleep(0.02)  # the workers' round trip: long enough for overlaps to show
        finally:
            for i in instances:
                self.inflight[i] -= 1
        if request.path == "/health":
            return web.json_response({"event_id": "e", "error_codes": {"0": 0}})
        return web.json_response({"event_id": "e", "num_tokens": 7})


@pytest.fixture
async def controller() -> AsyncIterator[tuple[StrictController, str]]:
    strict = StrictController()
    app = web.Application()
    app.router.add_post("/{kind}", strict.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield strict, f"http://127.0.0.1:{server.port}"
    await server.close()


async def test_concurrent_control_calls_to_one_instance_are_serialised(
        controller: tuple[StrictController, str]) -> None:
    strict, url = controller
    async with httpx.AsyncClient() as http:
        client = LMCacheClient(url, http, retry=RetrySettings(max_attempts=1))  # no retry may hide a 500
        calls = []
        for instance in ("i1", "i2"):
            calls += [client.clear(instance, "LocalCPUBackend") for _ in range(4)]
            calls += [client.pin(instance, "LocalCPUBackend", [1, 2, 3]),
                      client.compress(instance, "zstd", "LocalCPUBackend", [1, 2]),
                      client.decompress(instance, "zstd", "LocalCPUBackend"),
                      client.evict(instance, [1, 2]), client.health(instance)]
        calls.append(client.move(("i1", "LocalCPUBackend"), ("i2", "LocalCPUBackend")))
        results = await asyncio.gather(*calls)
    assert strict.overlaps == 0 and strict.calls == len(calls)
    assert results.count(7) == 2 * 7 + 1 and results.count("evicted") == 2
    assert strict.most_at_once == 2  # two instances were served side by side, not one after the other


async def test_lookups_are_not_held_up_by_control_calls(controller: tuple[StrictController, str]) -> None:
    _, url = controller
    async with httpx.AsyncClient() as http:
        client = LMCacheClient(url, http, retry=RetrySettings(max_attempts=1))
        held = client._serialised("i1")  # noqa: SLF001 - as a long control call to i1 would hold it
        await held.acquire()
        clear = asyncio.create_task(client.clear("i1", "LocalCPUBackend"))
        result = await asyncio.wait_for(client.lookup([1, 2, 3]), 2)  # answered while i1 is busy
        assert result.layout == {} and not clear.done()
        held.release()
        assert await asyncio.wait_for(clear, 2) == 7
