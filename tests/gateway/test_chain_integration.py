"""Filters in a live gateway: preferred endpoint, filter errors, local replies, learned prefix affinity."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import httpx
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

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


# ---- a client error at the prefix holder keeps its affinity (tokenizer + kvcache, local index) ----


SHARED = list(range(1000, 1512))  # a two-chunk shared prefix (e.g. a system prompt)


def _model_dir(path: Path) -> Path:
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path


async def _complete_shared(client: httpx.AsyncClient, url: str, tail: int) -> httpx.Response:
    return await client.post(f"{url}/v1/completions", json={"model": "fake-model", "prompt": SHARED + [tail] * 300,
                                                             "max_tokens": 4})


async def test_a_client_error_at_the_holder_keeps_the_shared_prefix_affinity(tmp_path: Path) -> None:
    """A 400 (say, max_tokens too large) from the endpoint holding a shared system
    prompt used to wipe that prefix from the local index: later requests lost affinity."""
    fakes = {name: FakeBackend(name) for name in ("a", "b")}
    servers = {name: await start_backend(fake) for name, fake in fakes.items()}
    filters = (f"  - type: tokenizer\n    config: {{backend: local, model_dir: \"{_model_dir(tmp_path)}\"}}\n"
               "  - type: kvcache\n    config: {local_index: {ttl: 1m}}\n")
    log_path = tmp_path / "access.jsonl"
    gateway = await start_gateway(gateway_yaml({n: s.port for n, s in servers.items()}, log_path,
                                               lb_policy="cache_aware", extra_filters=filters))
    stack = Stack(gateway, fakes, servers, log_path)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            first = await _complete_shared(client, stack.url, 1)
            holder = first.headers["x-kvgate-endpoint"]
            fakes[holder].status = 400
            assert (await _complete_shared(client, stack.url, 2)).status_code == 400
            fakes[holder].status = None
            third = await _complete_shared(client, stack.url, 3)
            assert third.headers["x-kvgate-endpoint"] == holder
        await wait_until(lambda: len(stack.access_log()) == 3, message="three access-log lines")
        line = stack.access_log()[2]
        assert (line["tier"], line["decision"]) == ("prefix-index", "cache_hit")
        assert line["matched_tokens"][holder] >= 512
    finally:
        await gateway.close()
        for server in servers.values():
            await server.close()
