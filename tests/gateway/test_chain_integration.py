"""Filters in a live gateway: preferred endpoint, filter errors, local replies."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from filters.base import CONTINUE, Filter, FilterResult
from filters.keys import PREFERRED_ENDPOINT
from filters.registry import register
from kvkernel.context import RequestContext
from testbed.fake_openai import FakeBackend
from tests.conftest import wait_until
from tests.gateway.harness import Stack, gateway_yaml, start_backend, start_gateway


@register("test-prefer")
class PreferFromHeader(Filter):
    """Test filter: prefers the endpoint named by the body's `user` field; raises on 'explode'."""

    async def on_request(self, ctx: RequestContext) -> FilterResult:
        user = (ctx.json or {}).get("user")
        if user == "explode":
            raise ValueError("kaboom")
        if isinstance(user, str):
            ctx[PREFERRED_ENDPOINT] = user
        return CONTINUE


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    fakes = {eid: FakeBackend(eid) for eid in ("a", "b", "c")}
    servers = {eid: await start_backend(f) for eid, f in fakes.items()}
    log_path = tmp_path / "access.jsonl"
    yaml_text = gateway_yaml({e: s.port for e, s in servers.items()}, log_path, lb_policy="round_robin",
                             extra_filters="  - type: test-prefer\n")
    gw = await start_gateway(yaml_text)
    yield Stack(gw, fakes, servers, log_path)
    await gw.close()
    for server in servers.values():
        await server.close()


async def _complete(stack: Stack, user: str | None) -> tuple[int, str | None, dict]:
    body = {"model": "m", "prompt": "hi", **({"user": user} if user else {})}
    async with aiohttp.ClientSession() as session:
        async with session.post(stack.url + "/v1/completions", json=body) as resp:
            return resp.status, resp.headers.get("x-kvgate-endpoint"), json.loads(await resp.read())


async def test_preferred_endpoint_is_honoured_while_healthy(stack: Stack) -> None:
    for _ in range(5):
        status, endpoint, _ = await _complete(stack, "c")
        assert status == 200 and endpoint == "c"
    stack.backends["c"].healthy = False
    endpoint_c = stack.state.clusters["llm"].endpoint("c")
    assert endpoint_c is not None
    await wait_until(lambda: not endpoint_c.healthy)
    served = {(await _complete(stack, "c"))[1] for _ in range(4)}
    assert served == {"a", "b"}  # falls back to round robin over the healthy ones
    await wait_until(lambda: len(stack.access_log()) == 9)
    decisions = [line["decision"] for line in stack.access_log()]
    assert decisions[:5] == ["preferred"] * 5 and decisions[5:] == ["lb:round_robin"] * 4


async def test_a_failing_filter_gives_a_clean_500_naming_it(stack: Stack) -> None:
    status, endpoint, body = await _complete(stack, "explode")
    assert status == 500 and endpoint is None
    assert "test-prefer" in body["error"]["message"] and body["error"]["code"] == "filter_error"
    assert (await _complete(stack, None))[0] == 200
    await wait_until(lambda: len(stack.access_log()) == 2)
    assert stack.access_log()[0]["status"] == 500
