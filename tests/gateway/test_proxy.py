"""The proxy end to end: real gateway and backends on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from gateway.monitor import EndpointMonitor
from testbed.fake_openai import FakeBackend
from tests.conftest import wait_until
from tests.gateway.harness import Stack, gateway_yaml, start_backend, start_gateway

COMPLETION = {"model": "fake-model", "prompt": "Once upon a time", "max_tokens": 8}
CHAT = {"model": "fake-model", "messages": [{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": "hi"}]}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    fakes = {"a": FakeBackend("a"), "b": FakeBackend("b")}
    servers = {eid: await start_backend(f) for eid, f in fakes.items()}
    log_path = tmp_path / "access.jsonl"
    gw = await start_gateway(gateway_yaml({e: s.port for e, s in servers.items()}, log_path))
    yield Stack(gw, fakes, servers, log_path)
    await gw.close()
    for server in servers.values():
        await server.close()


async def _post(url: str, path: str, body: object, **kw: object) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, json=body, **kw) as resp:  # type: ignore[arg-type]
            return resp.status, CIMultiDict(resp.headers), await resp.read()


async def _direct(stack: Stack, backend: str, path: str, body: object) -> bytes:
    return (await _post(f"http://127.0.0.1:{stack.servers[backend].port}", path, body))[2]


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", COMPLETION),
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {**COMPLETION, "stream": True}),
    ("/v1/chat/completions", {**CHAT, "stream": True}),
])
async def test_responses_pass_through_byte_for_byte(stack: Stack, path: str, body: dict) -> None:
    status, headers, via_gateway = await _post(stack.url, path, body)
    assert status == 200
    endpoint = headers["x-kvgate-endpoint"]
    assert via_gateway == await _direct(stack, endpoint, path, body)
    if body.get("stream"):
        assert headers["Content-Type"].startswith("text/event-stream")
        assert via_gateway.endswith(b"data: [DONE]\n\n")


async def test_first_sse_chunk_arrives_while_backend_still_generating(stack: Stack) -> None:
    gate = asyncio.Event()
    for fake in stack.backends.values():
        fake.stream_gate = gate
    async with aiohttp.ClientSession() as session:
        async with session.post(stack.url + "/v1/completions", json={**COMPLETION, "stream": True}) as resp:
            first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=5)
            assert first.startswith(b"data: ") and b"tok0" in first
            assert not gate.is_set()  # the backend is still holding the rest of the stream
            gate.set()
            rest = await resp.read()
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_request_id_propagates_and_hop_by_hop_headers_are_dropped(stack: Stack) -> None:
    status, headers, _ = await _post(stack.url, "/v1/completions", COMPLETION,
                                     headers={"x-request-id": "req-123", "Proxy-Authorization": "secret",
                                              "x-custom": "kept"})
    assert status == 200 and headers["x-request-id"] == "req-123"
    seen = CIMultiDict(stack.backends[headers["x-kvgate-endpoint"]].seen_headers[-1])
    assert seen["x-request-id"] == "req-123" and seen["x-custom"] == "kept"
    assert "Proxy-Authorization" not in seen


async def test_usage_and_routing_fields_are_logged_without_the_prompt(stack: Stack) -> None:
    for fake in stack.backends.values():
        fake.cached_tokens = 7
    await _post(stack.url, "/v1/chat/completions", {**CHAT, "stream": True})
    await wait_until(lambda: len(stack.access_log()) == 1, message="access log line")
    (line,) = stack.access_log()
    assert line["status"] == 200 and line["endpoint"] in ("a", "b") and line["cached_tokens"] == 7
    assert line["model"] == "fake-model" and len(line["prompt_hash"]) == 24 and line["stream"] is True
    assert line["ttfb_ms"] is not None and line["latency_ms"] >= line["ttfb_ms"]
    assert "be brief" not in json.dumps(line)


@pytest.mark.parametrize("data,status,code", [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b'{"model": 5, "prompt": "x"}', 400, "invalid_prompt"),
    (b'{"model": "m", "prompt": [1, "x"]}', 400, "invalid_prompt"),
    (b'{"model": "m", "messages": [{"content": "no role"}]}', 400, "invalid_prompt"),
    (b'{"model": "m", "prompt": "x", "stream": "yes"}', 400, "invalid_prompt"),
    (b'{"prompt": "' + b"x" * 70_000 + b'"}', 413, "body_too_large"),
])
async def test_bad_bodies_get_openai_errors_and_the_gateway_keeps_serving(stack: Stack, data: bytes, status: int,
                                                                          code: str) -> None:
    path = "/v1/chat/completions" if b"messages" in data else "/v1/completions"
    got, _, body = await _post(stack.url, path, None, data=data, headers={"Content-Type": "application/json"})
    error = json.loads(body)["error"]
    assert got == status and error["code"] == code and error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (await _post(stack.url, "/v1/completions", COMPLETION))[0] == 200
    assert sum(len(f.requests) for f in stack.backends.values()) == 1  # the bad ones never reached a backend


async def test_unknown_route_is_404(stack: Stack) -> None:
    status, _, body = await _post(stack.url, "/other", COMPLETION)
    assert status == 404 and json.loads(body)["error"]["code"] == "route_not_found"


async def test_dead_endpoint_is_failed_over_ejected_and_readmitted(tmp_path: Path) -> None:
    fakes = {"a": FakeBackend("a"), "b": FakeBackend("b")}
    servers = {eid: await start_backend(f) for eid, f in fakes.items()}
    log_path = tmp_path / "access.jsonl"
    # Health checks driven by hand (monitor=False) so the order of events is deterministic.
    gw = await start_gateway(gateway_yaml({e: s.port for e, s in servers.items()}, log_path), monitor=False)
    stack = Stack(gw, fakes, servers, log_path)
    try:
        cluster = stack.state.clusters["llm"]
        endpoint_a = cluster.endpoint("a")
        assert endpoint_a is not None and stack.state.http is not None
        monitor = EndpointMonitor([cluster], stack.state.http)
        port_a = servers["a"].port
        await servers["a"].close()
        for _ in range(4):
            status, headers, _ = await _post(stack.url, "/v1/completions", COMPLETION)
            assert status == 200 and headers["x-kvgate-endpoint"] == "b"
        await wait_until(lambda: len(stack.access_log()) == 4)
        retried = [line for line in stack.access_log() if line["retries"] == 1]
        assert retried and retried[0]["decision"].startswith("failover")
        await monitor.check(cluster, endpoint_a)
        assert not endpoint_a.healthy
        stack.servers["a"] = await start_backend(fakes["a"], port=port_a)
        await monitor.check(cluster, endpoint_a)
        await wait_until(lambda: endpoint_a.eligible(), message="a's breaker half-open")
        assert endpoint_a.healthy
        served = set()
        for _ in range(6):
            served.add((await _post(stack.url, "/v1/completions", COMPLETION))[1]["x-kvgate-endpoint"])
        assert served == {"a", "b"}
    finally:
        await gw.close()
        for server in stack.servers.values():
            await server.close()


async def test_health_checks_eject_and_readmit_in_the_background(stack: Stack) -> None:
    endpoint_a = stack.state.clusters["llm"].endpoint("a")
    assert endpoint_a is not None
    stack.backends["a"].healthy = False
    await wait_until(lambda: not endpoint_a.healthy, message="a ejected")
    for _ in range(4):
        assert (await _post(stack.url, "/v1/completions", COMPLETION))[1]["x-kvgate-endpoint"] == "b"
    stack.backends["a"].healthy = True
    await wait_until(lambda: endpoint_a.healthy, message="a re-admitted")


async def test_all_endpoints_down_gives_502_or_503(stack: Stack) -> None:
    for server in stack.servers.values():
        await server.close()
    status, _, body = await _post(stack.url, "/v1/completions", COMPLETION)
    assert status in (502, 503) and json.loads(body)["error"]["code"] in ("upstream_unavailable",
                                                                          "no_healthy_endpoint")
    await wait_until(lambda: all(not e.healthy for e in stack.state.clusters["llm"].endpoints))
    status, _, body = await _post(stack.url, "/v1/completions", COMPLETION)
    assert status == 503 and json.loads(body)["error"]["code"] == "no_healthy_endpoint"


async def test_503_is_retried_on_another_endpoint_without_tripping_the_breaker(stack: Stack) -> None:
    stack.backends["a"].status = 503
    for _ in range(8):
        status, headers, _ = await _post(stack.url, "/v1/completions", COMPLETION)
        assert status == 200 and headers["x-kvgate-endpoint"] == "b"
    endpoint_a = stack.state.clusters["llm"].endpoint("a")
    assert endpoint_a is not None and endpoint_a.breaker.state.value == "closed"


async def test_4xx_is_passed_through_and_not_a_failure(stack: Stack) -> None:
    for fake in stack.backends.values():
        fake.status = 400
    for _ in range(5):
        status, _, _ = await _post(stack.url, "/v1/completions", COMPLETION)
        assert status == 400
    assert all(e.breaker.state.value == "closed" for e in stack.state.clusters["llm"].endpoints)


async def test_502_from_every_backend_opens_breakers_then_they_recover(stack: Stack) -> None:
    for fake in stack.backends.values():
        fake.status = 502
    endpoints = stack.state.clusters["llm"].endpoints
    statuses = [(await _post(stack.url, "/v1/completions", COMPLETION))[0] for _ in range(5)]
    assert statuses[0] == 502 and set(statuses) <= {502, 503}
    assert all(e.breaker.state.value == "open" for e in endpoints)
    assert (await _post(stack.url, "/v1/completions", COMPLETION))[0] == 503
    for fake in stack.backends.values():
        fake.status = None
    await wait_until(lambda: all(e.breaker.available() for e in endpoints), message="half-open")
    assert (await _post(stack.url, "/v1/completions", COMPLETION))[0] == 200


async def test_client_disconnect_mid_stream_frees_the_endpoint(stack: Stack) -> None:
    gate = asyncio.Event()
    for fake in stack.backends.values():
        fake.stream_gate = gate
    async with aiohttp.ClientSession() as session:
        resp = await session.post(stack.url + "/v1/completions", json={**COMPLETION, "stream": True})
        await resp.content.readuntil(b"\n\n")
        assert sum(e.inflight for e in stack.state.clusters["llm"].endpoints) == 1
        resp.close()
    # The gateway notices at once and closes the upstream: the backend stops generating.
    await wait_until(lambda: sum(f.cancelled for f in stack.backends.values()) == 1, message="backend cancelled")
    await wait_until(lambda: sum(e.inflight for e in stack.state.clusters["llm"].endpoints) == 0
                     and stack.state.inflight == 0, message="in-flight back to 0")
    await wait_until(lambda: len(stack.access_log()) == 1)
    assert (await _post(stack.url, "/v1/completions", COMPLETION))[0] == 200


async def test_models_are_merged_and_gateway_probes_answer(stack: Stack) -> None:
    stack.backends["b"].model = "other-model"
    async with aiohttp.ClientSession() as session:
        async with session.get(stack.url + "/v1/models") as resp:
            ids = sorted(m["id"] for m in (await resp.json())["data"])
        assert resp.status == 200 and ids == ["fake-model", "other-model"]
        async with session.get(stack.url + "/healthz") as resp:
            assert resp.status == 200
        async with session.get(stack.url + "/readyz") as resp:
            assert resp.status == 200 and (await resp.json())["eligible_endpoints"] == {"llm": 2}
        async with session.get(stack.url + "/metrics") as resp:
            text = await resp.text()
        assert 'kvgate_endpoint_healthy{endpoint="a"} 1.0' in text


async def test_backend_load_is_scraped_from_vllm_metrics(stack: Stack) -> None:
    stack.backends["a"].waiting = 5
    stack.backends["a"].kv_usage = 0.5
    endpoint_a = stack.state.clusters["llm"].endpoint("a")
    assert endpoint_a is not None
    await wait_until(lambda: endpoint_a.num_requests_waiting == 5 and endpoint_a.kv_cache_usage == 0.5)


async def test_deeply_nested_json_is_a_400_not_a_crash(stack: Stack) -> None:
    data = b"[" * 30_000 + b"]" * 30_000
    status, _, body = await _post(stack.url, "/v1/completions", None, data=data,
                                  headers={"Content-Type": "application/json"})
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    assert (await _post(stack.url, "/v1/completions", COMPLETION))[0] == 200
