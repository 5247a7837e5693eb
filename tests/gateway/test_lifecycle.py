"""One exchange owns the lifecycle: every reply kind passes `on_response` and
`on_complete` (a counting filter sees each) and gets an access-log line; a picker
defined only in this module is selected from YAML and routes requests."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from filters.base import CONTINUE, Filter, FilterResult, ResponseHead, stop
from filters.registry import register
from gateway.endpoints import Endpoint
from gateway.pickers.base import Choice, Picker
from gateway.pickers.registry import register_picker
from kvkernel.context import RequestContext
from kvkernel.decode import ConfigError
from testbed.fake_openai import FakeBackend
from testbed.procs import free_port
from tests.conftest import wait_until
from tests.gateway.harness import Stack, gateway_yaml, start_backend, start_gateway

HOOKS: dict[str, list[str]] = defaultdict(list)  # request id -> hooks seen, in order


@register("test-count")
class CountHooks(Filter):
    """Records every hook per request id; STOPs with a 418 when the body's user is 'stop'."""

    async def on_request(self, ctx: RequestContext) -> FilterResult:
        HOOKS[ctx.request_id].append("request")
        if (ctx.json or {}).get("user") == "stop":
            return stop(418, "stopped by the test filter", code="teapot")
        return CONTINUE

    async def on_response(self, ctx: RequestContext, head: ResponseHead) -> None:
        HOOKS[ctx.request_id].append(f"response:{head.status}")
        head.headers["x-test-saw-head"] = "1"

    async def on_complete(self, ctx: RequestContext) -> None:
        HOOKS[ctx.request_id].append("complete")


@dataclass(frozen=True, slots=True)
class LastConfig:
    skip: int = 0  # how many candidates from the end to skip


@register_picker("test_last")
class LastCandidate(Picker):
    """Test picker: the last candidate (minus `skip`)."""

    Config = LastConfig
    config: LastConfig

    def pick(self, candidates: Sequence[Endpoint], ctx: RequestContext) -> Choice:
        return Choice(candidates[max(0, len(candidates) - 1 - self.config.skip)], reason="last")


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    fakes = {eid: FakeBackend(eid) for eid in ("a", "b")}
    servers = {eid: await start_backend(f) for eid, f in fakes.items()}
    log_path = tmp_path / "access.jsonl"
    ports = {e: s.port for e, s in servers.items()} | {"dead": free_port()}  # nothing listens on "dead"
    text = gateway_yaml(ports, log_path, lb_policy="round_robin", extra_filters="  - type: test-count\n")
    gw = await start_gateway(text, monitor=False)
    yield Stack(gw, fakes, servers, log_path)
    await gw.close()
    for server in servers.values():
        await server.close()


async def send(stack: Stack, rid: str, method: str = "POST", path: str = "/v1/completions",
               body: Any = None, raw: bytes | None = None) -> tuple[int, bytes, str | None]:
    data = raw if raw is not None else json.dumps(body if body is not None else {"model": "m", "prompt": "hi"})
    async with aiohttp.ClientSession() as session, session.request(
            method, stack.url + path, data=data if method == "POST" else None,
            headers={"x-request-id": rid, "Content-Type": "application/json"}) as resp:
        return resp.status, await resp.read(), resp.headers.get("x-test-saw-head")


def only(stack: Stack, *names: str) -> None:
    """Leave exactly the named endpoints eligible."""
    for ep in stack.state.clusters["llm"].endpoints:
        ep.healthy = ep.id in names


async def test_every_reply_kind_passes_every_response_hook(stack: Stack) -> None:
    only(stack, "a", "b")
    cases: list[tuple[str, int, dict[str, Any]]] = [
        ("upstream", 200, {}),
        ("stream", 200, {"body": {"model": "m", "prompt": "hi", "stream": True}}),
        ("local-reply", 418, {"body": {"model": "m", "prompt": "hi", "user": "stop"}}),
        ("too-large", 413, {"raw": b'{"prompt": "' + b"x" * 70_000 + b'"}'}),
        ("models", 200, {"method": "GET", "path": "/v1/models"}),
    ]
    for rid, status, kw in cases:
        got, _, saw_head = await send(stack, rid, **kw)
        assert (rid, got, saw_head) == (rid, status, "1")
    only(stack, "dead")
    assert (await send(stack, "upstream-failure"))[0] == 502
    only(stack)
    assert (await send(stack, "no-endpoint"))[0] == 503
    only(stack, "a", "b")
    stack.state.draining = True
    assert (await send(stack, "draining"))[0] == 503
    stack.state.draining = False

    rids = [c[0] for c in cases] + ["upstream-failure", "no-endpoint", "draining"]
    await wait_until(lambda: len(stack.access_log()) == len(rids), message="an access-log line per reply")
    for rid in rids:
        hooks = HOOKS[rid]
        assert hooks[-1] == "complete" and sum(h.startswith("response:") for h in hooks) == 1, (rid, hooks)
    # Replies the gateway makes before the chain ran skip only on_request.
    assert HOOKS["too-large"] == ["response:413", "complete"]
    assert HOOKS["draining"] == ["response:503", "complete"]
    assert HOOKS["models"] == ["request", "response:200", "complete"]
    logged = {line["request_id"]: line for line in stack.access_log()}
    assert {rid: logged[rid]["status"] for rid in rids} == {
        "upstream": 200, "stream": 200, "local-reply": 418, "too-large": 413, "models": 200,
        "upstream-failure": 502, "no-endpoint": 503, "draining": 503}
    assert logged["local-reply"]["decision"] == "local_reply"
    assert logged["upstream-failure"]["error"] and logged["upstream-failure"]["endpoint"] == "dead"


async def test_a_picker_from_a_test_module_routes_requests(tmp_path: Path) -> None:
    fakes = {eid: FakeBackend(eid) for eid in ("a", "b", "c")}
    servers = {eid: await start_backend(f) for eid, f in fakes.items()}
    log_path = tmp_path / "access.jsonl"
    text = gateway_yaml({e: s.port for e, s in servers.items()}, log_path)
    text = text.replace("    lb_policy: least_inflight\n", "    picker: {type: test_last, config: {skip: 1}}\n")
    gw = await start_gateway(text, monitor=False)
    stack = Stack(gw, fakes, servers, log_path)
    try:
        for i in range(4):
            assert (await send(stack, f"p{i}"))[0] == 200
        assert [len(f.requests) for f in fakes.values()] == [0, 4, 0]
        await wait_until(lambda: len(stack.access_log()) == 4)
        assert {(line["decision"], line["decision_reason"]) for line in stack.access_log()} == {
            ("lb:test_last", "last")}
    finally:
        await gw.close()
        for server in servers.values():
            await server.close()


def test_picker_config_errors_name_the_yaml_path(tmp_path: Path) -> None:
    text = gateway_yaml({"a": 9}, tmp_path / "log.jsonl").replace(
        "    lb_policy: least_inflight\n", "    picker: {type: test_last, config: {skip: x}}\n")
    with pytest.raises(ConfigError, match=r"clusters\[0\]\.picker\.config\.skip"):
        from gateway.config import load_config_text
        from gateway.plan import plan_gateway

        plan_gateway(load_config_text(text))
