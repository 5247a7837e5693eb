"""Adversarial input and misbehaving upstreams against the real gateway on 127.0.0.1.

Standard: bad input gets a clear error and loses nothing; dead, slow or broken
backends cost at most the requests they hold; the gateway keeps serving. Several
of these were written failing against the first version and fixed since.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from yarl import URL

from gateway.monitor import parse_backend_load
from gateway.state import STATE_KEY, GatewayState
from testbed.fake_openai import FakeBackend
from testbed.procs import free_port, start_kvgate
from tests.conftest import wait_until
from tests.gateway.adversarial_backend import (
    GZIP_BODY,
    EchoBackend,
    RawBackend,
    StaleKeepAliveBackend,
    create_echo_app,
)
from tests.gateway.harness import gateway_yaml, start_backend, start_gateway

COMPLETION = {"model": "m", "prompt": "hello"}
JSON = {"Content-Type": "application/json"}


@asynccontextmanager
async def echo_servers(*names: str) -> AsyncIterator[dict[str, tuple[EchoBackend, TestServer]]]:
    found: dict[str, tuple[EchoBackend, TestServer]] = {}
    try:
        for name in names:
            backend = EchoBackend(name)
            server = TestServer(create_echo_app(backend), host="127.0.0.1")
            await server.start_server()
            found[name] = (backend, server)
        yield found
    finally:
        for _, server in found.values():
            await server.close()


@asynccontextmanager
async def gateway(ports: dict[str, int], tmp_path: Path, *, monitor: bool = False,
                  **yaml_kw: Any) -> AsyncIterator[tuple[str, GatewayState]]:
    first_byte = yaml_kw.pop("first_byte", None)
    text = gateway_yaml(ports, tmp_path / "access.jsonl", **yaml_kw)
    if first_byte:
        text = text.replace("first_byte: 5s", f"first_byte: {first_byte}")
    server = await start_gateway(text, monitor=monitor)
    try:
        yield f"http://127.0.0.1:{server.port}", server.app[STATE_KEY]
    finally:
        await server.close()


async def post(url: str, body: bytes | Any, headers: dict[str, str] | None = None,
               path: str = "/v1/completions") -> tuple[int, CIMultiDict[str], bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, data=data, headers={**JSON, **(headers or {})}) as resp:
            return resp.status, CIMultiDict(resp.headers), await resp.read()


def error_code(raw: bytes) -> str:
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return str(error["code"])


async def still_serving(url: str) -> None:
    status, _, _ = await post(url, COMPLETION)
    assert status == 200


# --- request bodies ------------------------------------------------------------------------------

async def test_chunked_body_over_limit_without_content_length_is_413(tmp_path: Path) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):  # 160 KiB against a 64 KiB limit, no Content-Length
            yield b" " * 4096

    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, _):
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/completions", data=chunks(), headers=JSON) as resp:
                assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
                assert resp.status == 413 and error_code(await resp.read()) == "body_too_large"
        await still_serving(url)
        assert len(be["a"][0].seen) == 1  # only the good request reached the backend


@pytest.mark.parametrize("data,code", [
    (b'{"model": "m", "prompt": "\xff\xfe"}', "invalid_json"),  # invalid UTF-8
    (b'"just a string"', "invalid_json"),
    (b"42", "invalid_json"),
    (b"null", "invalid_json"),
    (b"[]", "invalid_json"),
    (b'{"model": "m", "prompt": "x"', "invalid_json"),  # truncated
    (b'{"model": "m", "prompt": [1.5]}', "invalid_prompt"),
    (b'{"model": "m", "prompt": [[1], []]}', "invalid_prompt"),
    (b'{"model": ["m"], "prompt": "x"}', "invalid_prompt"),
])
async def test_bad_completion_bodies_are_400_and_never_forwarded(tmp_path: Path, data: bytes, code: str) -> None:
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, _):
        status, headers, raw = await post(url, data)
        assert status == 400 and error_code(raw) == code and headers["x-request-id"]
        await still_serving(url)
        assert len(be["a"][0].seen) == 1


@pytest.mark.parametrize("messages,param", [
    ("hi", "messages"),
    ([], "messages"),
    (["hi"], "messages[0]"),
    ([{"role": 1, "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"text": "x"}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text"),
])
async def test_bad_chat_bodies_name_the_param(tmp_path: Path, messages: Any, param: str) -> None:
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, _):
        status, _, raw = await post(url, {"model": "m", "messages": messages}, path="/v1/chat/completions")
        assert status == 400 and json.loads(raw)["error"]["param"] == param
        assert be["a"][0].seen == []


async def test_lone_surrogate_in_prompt_is_not_a_server_error(tmp_path: Path) -> None:
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, _):
        status, _, raw = await post(url, b'{"model": "m", "prompt": "abc \\ud800 def"}')
        assert status < 500, raw


async def _first_depth_rejected(url: str, lo: int, hi: int) -> int:
    """Smallest nesting depth the gateway answers 400 (monotone: json.loads' recursion limit)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if (await post(url, _nested(mid), path="/v1/chat/completions"))[0] == 400:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _nested(depth: int) -> bytes:
    return b'{"model":"m","messages":[{"role":"user","content":"x","x":' + b"[" * depth + b"]" * depth + b"}]}"


async def test_nesting_just_under_the_parse_limit_is_never_a_500(tmp_path: Path) -> None:
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, _):
        limit = await _first_depth_rejected(url, 100, 3000)
        statuses = {d: (await post(url, _nested(d), path="/v1/chat/completions"))[0]
                    for d in range(limit - 30, limit)}
        assert all(s < 500 for s in statuses.values()), {d: s for d, s in statuses.items() if s >= 500}


async def test_gzip_request_body_reaches_the_backend_decodable(tmp_path: Path) -> None:
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, _):
        status, _, raw = await post(url, gzip.compress(json.dumps(COMPLETION).encode()),
                                    headers={"Content-Encoding": "gzip"})
        assert status == 200, raw
        seen = be["a"][0].seen[-1]
        assert json.loads(gzip.decompress(seen.body) if seen.headers.get("Content-Encoding") else seen.body) \
            == COMPLETION


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_undecodable_request_body_is_a_400(tmp_path: Path, encoding: str) -> None:
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, _):
        status, _, raw = await post(url, b"this is not " + encoding.encode(), headers={"Content-Encoding": encoding})
        assert status == 400 and error_code(raw) == "invalid_body"
        await still_serving(url)
        assert len(be["a"][0].seen) == 1


async def test_gzip_bomb_request_is_capped_by_max_body_bytes(tmp_path: Path) -> None:
    bomb = gzip.compress(b'{"prompt": "' + b"a" * 8_000_000 + b'"}')  # ~8 KB on the wire, 8 MB decoded
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, _):
        status, _, raw = await post(url, bomb, headers={"Content-Encoding": "gzip"})
        assert len(bomb) < 65536 and status == 413 and error_code(raw) == "body_too_large"
        await still_serving(url)


# --- headers, methods, paths -----------------------------------------------------------------------

async def test_huge_request_header_is_rejected_and_the_gateway_keeps_serving(tmp_path: Path) -> None:
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, _):
        status, _, _ = await post(url, COMPLETION, headers={"x-huge": "h" * 40_000})
        assert status in (400, 431)
        many = {f"x-h{i}": "v" * 200 for i in range(100)}  # 20 KB of headers in many fields is fine
        assert (await post(url, COMPLETION, headers=many))[0] == 200
        assert be["a"][0].seen[-1].headers["x-h99"] == "v" * 200
        async with aiohttp.ClientSession() as session:  # a request line beyond aiohttp's 8190 bytes
            async with session.get(url + "/v1/models?q=" + "x" * 10_000) as resp:
                assert resp.status in (400, 414)
        await still_serving(url)


@pytest.mark.parametrize("method,body", [("HEAD", None), ("OPTIONS", None), ("DELETE", b"abc"),
                                         ("PUT", b'{"a": 1}'), ("GET", None)])
async def test_odd_methods_pass_through_with_query_and_body(tmp_path: Path, method: str, body: bytes | None) -> None:
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, _):
        async with aiohttp.ClientSession() as session:
            async with session.request(method, url + "/v1/files/f-1?purpose=x&n=2", data=body,
                                       headers={"Content-Type": "text/plain"}) as resp:
                raw = await resp.read()
        seen = be["a"][0].seen[-1]
        assert resp.status == 200 and seen.method == method and seen.raw_path == "/v1/files/f-1?purpose=x&n=2"
        assert seen.body == (body or b"")
        assert raw == (b"" if method == "HEAD" else json.dumps(
            {"backend": "a", "method": method, "raw_path": seen.raw_path}).encode())


@pytest.mark.parametrize("ctype", ["application/octet-stream", "text/plain", "application/x-www-form-urlencoded"])
async def test_non_json_bodies_are_forwarded_untouched(tmp_path: Path, ctype: str) -> None:
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, _):
        async with aiohttp.ClientSession() as session:
            async with session.put(url + "/v1/files/f-1", data=b"not json {", headers={"Content-Type": ctype}) as resp:
                assert resp.status == 200
        assert be["a"][0].seen[-1].body == b"not json {"


async def test_json_without_a_content_type_is_still_checked(tmp_path: Path) -> None:
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, _):
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/completions", data=b"{bad", skip_auto_headers=["Content-Type"]) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_json"
        assert be["a"][0].seen == []


@pytest.mark.parametrize("raw_path", ["/v1/x?a=b%20c&q=a+b&empty=&flag", "/v1/%E2%82%AC?x=%E2%82%AC", "/v1/%41",
                                      "/v1/x?d=%2F&e=%7E"])
async def test_query_and_encoded_paths_are_forwarded_byte_for_byte(tmp_path: Path, raw_path: str) -> None:
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, _):
        async with aiohttp.ClientSession() as session:
            async with session.get(URL(url + raw_path, encoded=True)) as resp:
                assert resp.status == 200
        assert be["a"][0].seen[-1].raw_path == raw_path


@pytest.mark.parametrize("raw_path", ["/v1/../admin", "/v1/%2e%2e/admin", "/v1/./x", "/v1/a%2Fb/c", "/v1//double"])
async def test_ambiguous_paths_are_refused_not_forwarded(tmp_path: Path, raw_path: str) -> None:
    """Dot segments, encoded slashes and empty segments could be read differently by the
    backend than by the gateway's routes and filters (see gateway/hygiene.py)."""
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, _):
        async with aiohttp.ClientSession() as session:
            async with session.get(URL(url + raw_path, encoded=True)) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_request_target"
        assert be["a"][0].seen == []


async def test_upstream_errors_carry_the_request_id(tmp_path: Path) -> None:
    dead = await RawBackend(b"").start()  # accepts, reads the request, closes without answering
    try:
        async with gateway({"dead": dead.port}, tmp_path) as (url, _):
            status, headers, raw = await post(url, COMPLETION, headers={"x-request-id": "rid-42"})
            assert status == 502 and error_code(raw) == "upstream_unavailable"
            assert headers.get("x-request-id") == "rid-42"
    finally:
        await dead.close()


# --- responses ------------------------------------------------------------------------------------

async def test_gzip_response_passes_through_byte_for_byte(tmp_path: Path) -> None:
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, _):
        be["a"][0].mode = "gzip"
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            async with session.post(url + "/v1/completions", json=COMPLETION,
                                    headers={"Accept-Encoding": "gzip"}) as resp:
                raw = await resp.read()
        assert resp.status == 200 and resp.headers["Content-Encoding"] == "gzip" and raw == GZIP_BODY
        assert be["a"][0].seen[-1].headers["Accept-Encoding"] == "gzip"


async def test_repeated_response_headers_all_reach_the_client(tmp_path: Path) -> None:
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, _):
        be["a"][0].mode = "multi_header"
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/completions", json=COMPLETION) as resp:
                assert resp.status == 200
                assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
                assert resp.headers.getall("Link") == ["<https://x/1>; rel=next", "<https://x/2>; rel=prev"]


async def test_large_stream_is_backpressured_not_buffered(tmp_path: Path) -> None:
    """A client that stops reading stalls the backend: the gateway holds a bounded amount."""
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, _):
        backend = be["a"][0]
        backend.mode, backend.stream_total = "big_stream", 512 * 1024 * 1024
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/completions", json=COMPLETION) as resp:
                await resp.content.readexactly(65536)
                # Poll until the backend's progress stops (it is blocked on drain), with a deadline.
                last = -1
                for _ in range(200):
                    if backend.written == last:
                        break
                    last = backend.written
                    await asyncio.sleep(0.05)
                assert backend.written == last, "backend never stalled: the gateway buffers without bound"
                assert backend.written < 64 * 1024 * 1024
                resp.close()


async def test_backend_closing_mid_stream_truncates_and_is_counted(tmp_path: Path) -> None:
    """A broken SSE stream ends with an OpenAI-shaped error event; any other body is cut
    short (never a clean end of body)."""
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, state):
        for mode in ("cut_stream", "cut_length"):
            be["a"][0].mode = mode
            async with aiohttp.ClientSession() as session:
                async with session.post(url + "/v1/completions", json=COMPLETION) as resp:
                    assert resp.status == 200
                    if mode == "cut_length":
                        with pytest.raises(aiohttp.ClientPayloadError):
                            await resp.read()
                    else:
                        body = await resp.read()
                        last = body.strip().split(b"\n\n")[-1]
                        assert last.startswith(b"data: {") and json.loads(last[6:])["error"]["code"] == \
                            "upstream_broken"
        endpoint = state.clusters["llm"].endpoint("a")
        assert endpoint is not None and endpoint.stats.failures == 2
        be["a"][0].mode = "echo"
        await still_serving(url)
        assert state.inflight == 0 and endpoint.inflight == 0


async def test_backend_that_always_breaks_mid_stream_trips_its_breaker(tmp_path: Path) -> None:
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, state):
        be["a"][0].mode = "cut_stream"
        for _ in range(3):  # failure_threshold: 3
            async with aiohttp.ClientSession() as session:
                async with session.post(url + "/v1/completions", json=COMPLETION) as resp:
                    assert b'"error"' in await resp.read()
        endpoint = state.clusters["llm"].endpoint("a")
        assert endpoint is not None and endpoint.breaker.state.value == "open"


# --- slow, dead and broken upstreams ---------------------------------------------------------------

async def test_slow_answers_time_out_once_without_retry_or_breaker(tmp_path: Path) -> None:
    """`first_byte` bounds a stream's head, `total` a non-streamed answer (never
    first_byte); a timeout after the backend took the request is not run again
    elsewhere and does not count against the breaker."""
    async with echo_servers("slow", "fast") as be, gateway(
            {"slow": be["slow"][1].port, "fast": be["fast"][1].port}, tmp_path, first_byte="300ms, total: 1s",
            lb_policy="round_robin") as (url, state):
        for name in ("slow", "fast"):
            be[name][0].head_delay = 0.6
        status, _, _ = await post(url, COMPLETION)
        assert status == 200  # longer than first_byte, shorter than total
        status, _, raw = await post(url, {**COMPLETION, "stream": True})
        assert status == 504 and error_code(raw) == "upstream_timeout"
        for name in ("slow", "fast"):
            be[name][0].head_delay = 2.0
        status, _, raw = await post(url, COMPLETION)
        assert status == 504 and error_code(raw) == "upstream_timeout"
        assert len(be["slow"][0].seen) + len(be["fast"][0].seen) == 3  # no attempt ran twice
        assert all(e.breaker.state.value == "closed" for e in state.clusters.all_endpoints())
        await wait_until(lambda: state.inflight == 0)
        log = [json.loads(line) for line in (tmp_path / "access.jsonl").read_text().splitlines()]
        assert [(r["status"], r["retries"]) for r in log] == [(200, 0), (504, 0), (504, 0)]


async def test_concurrent_load_with_one_endpoint_dying_loses_nothing(tmp_path: Path) -> None:
    async with echo_servers("dying", "ok") as be, gateway(
            {"dying": be["dying"][1].port, "ok": be["ok"][1].port}, tmp_path, lb_policy="round_robin") as (url, st):
        dying, dying_server = be["dying"]
        dying.head_gate = asyncio.Event()  # requests pile up on the dying endpoint

        async with aiohttp.ClientSession() as session:
            async def one(i: int) -> int:
                async with session.post(url + "/v1/completions", json={**COMPLETION, "prompt": f"p{i}"}) as resp:
                    await resp.read()
                    return resp.status

            tasks = [asyncio.create_task(one(i)) for i in range(40)]
            await wait_until(lambda: len(dying.seen) >= 5, message="requests held by the dying endpoint")
            assert dying_server.runner is not None
            for site in list(dying_server.runner.sites):
                await site.stop()  # no new connections ...
            for transport in dying.transports:
                transport.abort()  # ... and every open one reset
            statuses = await asyncio.gather(*tasks)
        assert statuses == [200] * 40
        assert len(be["ok"][0].seen) == 40  # every request ended on the healthy endpoint
        await wait_until(lambda: st.inflight == 0)
        endpoint = st.clusters["llm"].endpoint("dying")
        assert endpoint is not None and endpoint.stats.failures >= 5 and endpoint.inflight == 0


@pytest.mark.parametrize("reply", [b"NOT HTTP\r\n\r\n",
                                   b"HTTP/1.1 200 OK\r\nX-Big: " + b"h" * 20_000 + b"\r\nContent-Length: 2\r\n\r\n{}"])
async def test_malformed_upstream_answer_fails_over(tmp_path: Path, reply: bytes) -> None:
    broken = await RawBackend(reply).start()
    try:
        async with echo_servers("good") as be, gateway({"broken": broken.port, "good": be["good"][1].port},
                                                         tmp_path, lb_policy="round_robin") as (url, state):
            statuses = [(await post(url, COMPLETION))[0] for _ in range(4)]
            assert broken.requests >= 1 and statuses == [200] * 4
            endpoint = state.clusters["llm"].endpoint("broken")
            assert endpoint is not None and endpoint.stats.failures == broken.requests
    finally:
        await broken.close()


async def test_stale_pooled_connection_is_retried_not_a_502(tmp_path: Path) -> None:
    backend = await StaleKeepAliveBackend().start()
    try:
        async with gateway({"only": backend.port}, tmp_path) as (url, _):
            statuses = [(await post(url, COMPLETION))[0] for _ in range(3)]
            assert backend.dropped >= 1  # the race happened ...
            assert statuses == [200, 200, 200]  # ... and cost the client nothing
    finally:
        await backend.close()


async def _open_then_half_open(state: GatewayState, endpoint_id: str) -> Any:
    endpoint = state.clusters["llm"].endpoint(endpoint_id)
    assert endpoint is not None
    for _ in range(endpoint.breaker.failure_threshold):
        endpoint.breaker.record_failure()
    assert not endpoint.eligible()
    await wait_until(endpoint.eligible, message="half-open")  # recovery_timeout: 200ms
    return endpoint


async def test_client_leaving_during_half_open_trial_does_not_strand_the_endpoint(tmp_path: Path) -> None:
    async with echo_servers("a") as be, gateway({"a": be["a"][1].port}, tmp_path) as (url, state):
        endpoint = await _open_then_half_open(state, "a")
        backend = be["a"][0]
        backend.head_gate = asyncio.Event()
        session = aiohttp.ClientSession()
        request = asyncio.create_task(session.post(url + "/v1/completions", json=COMPLETION))
        await backend.started.wait()
        request.cancel()
        await session.close()  # the client is gone: the gateway cancels its handler
        await wait_until(lambda: state.inflight == 0, message="handler cancelled")
        backend.head_gate.set()
        await wait_until(endpoint.eligible, timeout=3, message="endpoint eligible again")


async def test_non_finite_backend_gauges_do_not_break_routing(tmp_path: Path, tiny_model_dir: Path) -> None:
    load = parse_backend_load('vllm:num_requests_waiting{m="x"} NaN\nvllm:kv_cache_usage_perc{m="x"} +Inf\n')
    chain = (f"  - {{type: tokenizer, config: {{backend: local, model_dir: \"{tiny_model_dir}\"}}}}\n"
             "  - type: kvcache\n")
    async with echo_servers("a", "b") as be, gateway({"a": be["a"][1].port, "b": be["b"][1].port}, tmp_path,
                                                      lb_policy="cache_aware", extra_filters=chain) as (url, state):
        for endpoint in state.clusters["llm"].endpoints:
            endpoint.load = load  # what the monitor stores after scraping that text
        assert [(await post(url, COMPLETION))[0] for _ in range(2)] == [200, 200]


# --- shutdown ------------------------------------------------------------------------------------------

async def test_sigterm_with_idle_keepalive_connection_exits_cleanly(tmp_path: Path) -> None:
    backend = await start_backend(FakeBackend("a"))
    port = free_port()
    config = tmp_path / "gw.yaml"
    text = gateway_yaml({"a": backend.port}, tmp_path / "access.jsonl", server=", drain_timeout: 60s")
    config.write_text(text.replace("port: 0,", f"port: {port},", 1))
    proc = start_kvgate("gateway", ["serve", "-c", str(config)], tmp_path)
    try:
        await asyncio.to_thread(proc.wait_http, f"http://127.0.0.1:{port}/healthz", 30)
        async with aiohttp.ClientSession() as session:  # its connection stays open and idle
            async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=COMPLETION) as resp:
                assert resp.status == 200 and resp.headers.get("Connection", "").lower() != "close"
                await resp.read()
            proc.signal(signal.SIGTERM)
            # Far below drain_timeout (60s): idle keep-alive connections do not hold the drain.
            assert await asyncio.to_thread(proc.stop, 10) == 0, proc.log_tail()
        assert "kvgate stopped" in proc.log_tail()
    finally:
        proc.kill()
        await backend.close()
