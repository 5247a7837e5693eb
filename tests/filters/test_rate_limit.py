"""The `rate-limit` filter: token buckets per key id or client IP, 429 with Retry-After,
completion tokens charged after the fact, a shared limit in a real Redis, Redis down."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from filters.auth import hash_key
from filters.rate_buckets import Bucket, MemoryStore, decide, retry_after_header
from filters.rate_limit import RateLimitConfig
from kvkernel.decode import ConfigError, decode_dataclass
from testbed.fake_openai import FakeBackend
from testbed.procs import free_port
from tests.gateway.harness import gateway_yaml, start_backend, start_gateway
from tests.redis_server import redis_url  # noqa: F401 - the session fixture

ALICE, BOB = "sk-alice-0123456789", "sk-bob-9876543210"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("req, tok, cost, allowed, limit, retry", [
    (1.0, 5.0, 3, True, "", 0.0),
    (0.5, 5.0, 3, False, "requests", 0.25),   # half a token short at 2/s
    (3.0, 0.0, 1, False, "tokens", 0.001),    # not in debt is needed, not the cost
    (3.0, -10.0, 1, False, "tokens", 10.001),  # 10 tokens of debt at 1/s
])
def test_decide(req: float, tok: float, cost: int, allowed: bool, limit: str, retry: float) -> None:
    verdict = decide(req, tok, Bucket(2.0, 4.0), Bucket(1.0, 100.0), cost)
    assert (verdict.allowed, verdict.limit) == (allowed, limit)
    assert verdict.retry_after == pytest.approx(retry)


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    assert [retry_after_header(s) for s in (0.0, 0.2, 1.0, 1.01, 59.5)] == ["1", "1", "1", "2", "60"]


async def test_memory_buckets_refill_and_refuse_without_taking() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    requests, tokens = Bucket(1.0, 2.0), Bucket(10.0, 20.0)
    assert (await store.take("a", requests, tokens, 5)).allowed
    assert (await store.take("a", requests, tokens, 5)).allowed
    refused = await store.take("a", requests, tokens, 5)
    assert not refused.allowed and refused.limit == "requests" and refused.retry_after == pytest.approx(1.0)
    assert (await store.take("b", requests, tokens, 5)).allowed  # another client has its own buckets
    clock.now += 1.0
    await store.charge("a", tokens, 40)  # completion tokens after the fact: 10 - 40 + 10 = -20
    refused = await store.take("a", requests, tokens, 0)
    assert refused.limit == "tokens" and refused.retry_after == pytest.approx(2.0, abs=0.01)
    clock.now += 2.1
    assert (await store.take("a", requests, tokens, 0)).allowed  # the refused take cost nothing


@pytest.mark.parametrize("raw, fragment", [
    ({}, "requests_per_second: give requests_per_second and/or tokens_per_minute"),
    ({"requests_per_second": 0}, "requests_per_second: must be > 0"),
    ({"requests_per_second": 1, "backend": "redis"}, "url: backend redis needs url"),
    ({"requests_per_second": 1, "url": "redis://x:1"}, "url: only used with backend: redis"),
    ({"requests_per_second": 1, "on_redis_error": "maybe"}, "on_redis_error: must be one of"),
])
def test_config_errors_name_the_field(raw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        decode_dataclass(RateLimitConfig, raw, "filters[1](rate-limit).config")


async def _gateway(tmp_path: Path, limit: str, port: int, *, auth: bool = False) -> TestServer:
    filters = ""
    if auth:
        keys = tmp_path / "keys"
        keys.write_text(f"alice:{hash_key(ALICE)}\nbob:{hash_key(BOB)}\n")
        filters += f'  - type: auth\n    config: {{keys_file: "{keys}"}}\n'
    filters += f"  - type: rate-limit\n    config: {limit}\n"
    return await start_gateway(gateway_yaml({"a": port}, tmp_path / "access.jsonl", extra_filters=filters))


async def _post(gw: TestServer, key: str | None = None) -> tuple[int, dict, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{gw.port}/v1/completions", headers=headers,
                                json={"model": "m", "prompt": "hello there"}) as resp:
            return resp.status, dict(resp.headers), json.loads(await resp.read())


@pytest.fixture
async def backend() -> AsyncIterator[TestServer]:
    server = await start_backend(FakeBackend("a"))
    yield server
    await server.close()


async def test_requests_per_second_per_client_ip_gives_429_with_retry_after(tmp_path: Path,
                                                                           backend: TestServer) -> None:
    gw = await _gateway(tmp_path, "{requests_per_second: 0.5, burst_requests: 2}", backend.port)
    try:
        assert [(await _post(gw))[0] for _ in range(2)] == [200, 200]
        status, headers, body = await _post(gw)
        assert status == 429 and headers["Retry-After"] == "2"
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "rate_limit_exceeded"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{gw.port}/metrics") as resp:
                assert 'kvgate_rate_limited_total{filter="rate-limit",limit="requests"} 1.0' in await resp.text()
    finally:
        await gw.close()


async def test_limits_are_per_api_key_id(tmp_path: Path, backend: TestServer) -> None:
    gw = await _gateway(tmp_path, "{requests_per_second: 0.1, burst_requests: 1}", backend.port, auth=True)
    try:
        assert (await _post(gw, ALICE))[0] == 200
        assert (await _post(gw, ALICE))[0] == 429
        assert (await _post(gw, BOB))[0] == 200  # same IP, another key: its own bucket
    finally:
        await gw.close()


async def test_completion_tokens_are_charged_after_the_fact(tmp_path: Path, backend: TestServer) -> None:
    # The fake answers with usage {prompt_tokens: 3, completion_tokens: 4}: 7 tokens out of a burst of 8.
    gw = await _gateway(tmp_path, "{tokens_per_minute: 6, burst_tokens: 8}", backend.port)
    try:
        assert (await _post(gw))[0] == 200  # admitted (not in debt), then charged 7: 1 left
        assert (await _post(gw))[0] == 200  # admitted, charged 7: 6 of debt
        status, headers, body = await _post(gw)
        assert status == 429 and "tokens" in body["error"]["message"]
        assert 55 <= int(headers["Retry-After"]) <= 61  # ~6 tokens of debt at 0.1 token/s
    finally:
        await gw.close()


async def test_replicas_share_one_limit_in_redis(tmp_path: Path, backend: TestServer,
                                                 redis_url: str) -> None:  # noqa: F811
    limit = f'{{requests_per_second: 0.05, burst_requests: 3, backend: redis, url: "{redis_url}", ' \
            f'prefix: "shared-{tmp_path.name}:", redis_timeout: 1s}}'
    one = await _gateway(tmp_path, limit, backend.port)
    two = await _gateway(tmp_path, limit, backend.port)
    try:
        statuses = [(await _post(gw))[0] for gw in (one, two, one, two)]
        assert statuses == [200, 200, 200, 429]  # 3 per 60 s for this client, across both replicas
        _, headers, _ = await _post(one)
        assert 1 <= int(headers["Retry-After"]) <= 20
    finally:
        await one.close()
        await two.close()


async def test_redis_tokens_per_minute_charges_usage(tmp_path: Path, backend: TestServer,
                                                     redis_url: str) -> None:  # noqa: F811
    limit = f'{{tokens_per_minute: 6, burst_tokens: 8, backend: redis, url: "{redis_url}", ' \
            f'prefix: "tok-{tmp_path.name}:", redis_timeout: 1s}}'
    gw = await _gateway(tmp_path, limit, backend.port)
    try:
        assert (await _post(gw))[0] == 200
        assert (await _post(gw))[0] == 200
        from tests.conftest import wait_until

        async def refused() -> bool:
            return (await _post(gw))[0] == 429  # the charge runs on the background queue

        await wait_until(refused, timeout=5, message="a 429 once usage was charged in Redis")
    finally:
        await gw.close()


@pytest.mark.parametrize("mode, expected", [("open", 200), ("closed", 503)])
async def test_redis_down_fails_open_or_closed_never_500(tmp_path: Path, backend: TestServer,
                                                         mode: str, expected: int) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    limit = f'{{requests_per_second: 1, backend: redis, url: "{dead}", on_redis_error: {mode}}}'
    gw = await _gateway(tmp_path, limit, backend.port)
    try:
        for _ in range(3):
            status, _, body = await _post(gw)
            assert status == expected
        if mode == "closed":
            assert body["error"]["code"] == "rate_limiter_unavailable"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{gw.port}/metrics") as resp:
                text = await resp.text()
        assert f'kvgate_rate_limit_backend_errors_total{{filter="rate-limit",outcome="{mode}"}} 3.0' in text
    finally:
        await gw.close()


def test_the_gateway_imports_without_redis() -> None:
    import subprocess
    import sys

    code = ("import sys; import filters.builtins, gateway.app; "
            "assert 'redis' not in sys.modules, 'redis imported by the gateway'")
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_prompt_tokens_are_charged_up_front_when_tokens_are_known() -> None:
    from unittest.mock import MagicMock

    from filters.base import Action, Services
    from filters.keys import TOKENS, Tokens
    from filters.rate_limit import RateLimitFilter
    from kvkernel.context import RequestContext

    config = decode_dataclass(RateLimitConfig, {"tokens_per_minute": 60, "burst_tokens": 10}, "c")
    limiter = RateLimitFilter(config, "rl", Services(clusters=MagicMock(), background=MagicMock(),
                                                     http=MagicMock()))
    await limiter.start()

    def request() -> RequestContext:
        ctx = RequestContext("r", "POST", "/v1/completions", remote="10.0.0.1")
        ctx[TOKENS] = Tokens(list(range(12)), "local")
        return ctx

    first = request()
    assert (await limiter.on_request(first)).action is Action.CONTINUE  # 10 -> -2
    first.usage.prompt_tokens, first.usage.completion_tokens = 12, 3
    await limiter.on_complete(first)  # only the 3 completion tokens: the prompt was charged up front
    refused = await limiter.on_request(request())
    assert refused.action is Action.STOP and refused.reply is not None
    assert refused.reply.status == 429 and refused.reply.headers["Retry-After"] == "6"  # 5 of debt at 1/s
