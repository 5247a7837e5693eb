"""Hot reload: a valid config applies to new requests while in-flight ones finish on
their generation, and state that still applies is kept; an invalid one is rejected
with its YAML path and the old one stays."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from filters.base import Filter
from filters.registry import register
from gateway.app import create_app
from gateway.config import load_config
from gateway.reload import GENERATIONS_KEY
from gateway.state import STATE_KEY, GatewayState
from testbed.fake_openai import FakeBackend
from tests.conftest import wait_until
from tests.gateway.harness import gateway_yaml, start_backend

EVENTS: list[tuple[str, str]] = []


@register("test-reload-probe")
class ReloadProbe(Filter):
    """Records when it starts and closes, and tags the response with its name."""

    async def start(self) -> None:
        EVENTS.append(("start", self.name))

    async def close(self) -> None:
        EVENTS.append(("close", self.name))

    async def on_response(self, ctx: Any, head: Any) -> None:
        head.headers["x-probe"] = self.name


@register("test-reload-broken")
class BrokenOnStart(Filter):
    async def start(self) -> None:
        raise RuntimeError("cannot open its resource")


SLOW_START = asyncio.Event()


@register("test-reload-slow")
class SlowToStart(Filter):
    """Starts only when the test opens SLOW_START, so a reload can be caught half-way."""

    async def start(self) -> None:
        EVENTS.append(("starting", self.name))
        await SLOW_START.wait()
        EVENTS.append(("start", self.name))

    async def on_response(self, ctx: Any, head: Any) -> None:
        head.headers["x-probe"] = self.name


class Rig:
    def __init__(self, tmp_path: Path, ports: dict[str, int]) -> None:
        self.path = tmp_path / "gw.yaml"
        self.log = tmp_path / "access.jsonl"
        self.ports = ports
        self.gateway: TestServer | None = None

    def write(self, ports: dict[str, int] | None = None, **kwargs: Any) -> None:
        self.path.write_text(gateway_yaml(ports or self.ports, self.log, **kwargs))

    @property
    def url(self) -> str:
        assert self.gateway is not None
        return f"http://127.0.0.1:{self.gateway.port}"

    @property
    def state(self) -> GatewayState:
        assert self.gateway is not None
        return self.gateway.app[STATE_KEY]

    async def reload(self) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            async with session.post(self.url + "/admin/reload") as resp:
                return resp.status, json.loads(await resp.read())

    async def complete(self, headers: dict[str, str] | None = None) -> tuple[int, aiohttp.typedefs.LooseHeaders]:
        async with aiohttp.ClientSession() as session:
            async with session.post(self.url + "/v1/completions", json={"model": "m", "prompt": "hi"},
                                    headers=headers or {}) as resp:
                await resp.read()
                return resp.status, resp.headers


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[Rig, dict[str, FakeBackend]]]:
    fakes = {e: FakeBackend(e) for e in ("a", "b", "c")}
    servers = {e: await start_backend(f) for e, f in fakes.items()}
    ports = {e: s.port for e, s in servers.items()}
    rig = Rig(tmp_path, {"a": ports["a"], "b": ports["b"]})
    rig.all_ports = ports  # type: ignore[attr-defined]
    rig.write(extra_filters="  - type: test-reload-probe\n    name: probe-1\n")
    app = create_app(load_config(rig.path), monitor=False, config_path=str(rig.path))
    rig.gateway = TestServer(app, host="127.0.0.1")
    await rig.gateway.start_server()  # cancels a handler whose client goes away, as `kvgate serve` does
    EVENTS.clear()
    yield rig, fakes
    await rig.gateway.close()
    for server in servers.values():
        await server.close()


async def test_a_valid_reload_keeps_endpoints_pickers_and_the_prefix_index(rig: tuple[Rig, Any]) -> None:
    gw, _ = rig
    before = gw.state
    endpoint_a = before.clusters["llm"].endpoint("a")
    picker, index = before.pickers["llm"], before.prefix_index
    for _ in range(4):
        assert (await gw.complete())[0] == 200
    requests_a = endpoint_a.stats.requests
    breaker = endpoint_a.breaker

    ports = gw.all_ports  # type: ignore[attr-defined]
    gw.write({"a": ports["a"], "c": ports["c"]}, extra_filters="  - type: test-reload-probe\n    name: probe-1\n")
    status, body = await gw.reload()
    assert status == 200, body
    assert body["generation"] == 1 and body["endpoints_kept"] == ["a"] and body["filters_started"] == []
    after = gw.state
    assert after.clusters["llm"].endpoint("a") is endpoint_a and endpoint_a.stats.requests == requests_a
    assert endpoint_a.breaker is breaker and endpoint_a.healthy
    assert after.clusters["llm"].endpoint("b") is None and after.clusters["llm"].endpoint("c") is not None
    assert after.pickers["llm"] is picker  # same picker type and config: learned state kept
    assert after.prefix_index is index
    assert EVENTS == []  # the unchanged filter was carried over: neither restarted nor closed
    seen = {(await gw.complete())[1].get("x-kvgate-endpoint") for _ in range(6)}
    assert seen == {"a", "c"}


async def test_a_changed_picker_is_rebuilt(rig: tuple[Rig, Any]) -> None:
    gw, _ = rig
    picker = gw.state.pickers["llm"]
    gw.write(lb_policy="round_robin", extra_filters="  - type: test-reload-probe\n    name: probe-1\n")
    assert (await gw.reload())[0] == 200
    assert gw.state.pickers["llm"] is not picker and gw.state.pickers["llm"].type_name == "round_robin"


async def test_in_flight_requests_finish_on_their_generation(rig: tuple[Rig, dict[str, FakeBackend]]) -> None:
    gw, fakes = rig
    gate = asyncio.Event()
    for fake in fakes.values():
        fake.stream_gate = gate
    async with aiohttp.ClientSession() as session:
        body = {"model": "m", "prompt": "hi", "stream": True}
        async with session.post(gw.url + "/v1/completions", json=body) as resp:
            assert resp.headers["x-probe"] == "probe-1"
            await resp.content.readuntil(b"\n\n")
            # The new generation has another probe and no longer has probe-1.
            gw.write(extra_filters="  - type: test-reload-probe\n    name: probe-2\n")
            status, answer = await gw.reload()
            assert status == 200 and answer["filters_started"] == ["probe-2"]
            assert EVENTS == [("start", "probe-2")]  # probe-1 still serves the open stream
            for fake in fakes.values():
                fake.stream_gate = None
            assert (await gw.complete())[1]["x-probe"] == "probe-2"
            gate.set()
            rest = await resp.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    await wait_until(lambda: ("close", "probe-1") in EVENTS, timeout=5, message="the old generation closed")
    generations = gw.gateway.app[GENERATIONS_KEY]  # type: ignore[union-attr]
    assert generations.retired == [] and gw.state.inflight == 0


async def test_an_invalid_config_is_rejected_with_its_path_and_the_old_one_stays(
        rig: tuple[Rig, Any], caplog: pytest.LogCaptureFixture) -> None:
    gw, _ = rig
    gw.path.write_text(gw.path.read_text().replace("max_attempts: 2", "max_attempts: 0"))
    status, body = await gw.reload()
    assert status == 400
    assert body["error"]["code"] == "invalid_config" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("clusters[0].retry.max_attempts: must be >= 1")
    assert "clusters[0].retry.max_attempts" in caplog.text  # logged too
    gw.path.write_text("clusters: [\n")
    assert (await gw.reload())[0] == 400
    generations = gw.gateway.app[GENERATIONS_KEY]  # type: ignore[union-attr]
    assert generations.current.number == 0
    status, headers = await gw.complete()
    assert status == 200 and headers["x-probe"] == "probe-1"


async def test_server_changes_are_reported_as_needing_a_restart(rig: tuple[Rig, Any]) -> None:
    gw, _ = rig
    gw.write(server=", drain_timeout: 5s", extra_filters="  - type: test-reload-probe\n    name: probe-1\n")
    status, body = await gw.reload()
    assert status == 200 and body["restart_needed"] == ["server.drain_timeout"]


async def test_a_filter_that_fails_to_start_rejects_the_reload(rig: tuple[Rig, Any]) -> None:
    gw, _ = rig
    gw.write(extra_filters="  - type: test-reload-probe\n    name: probe-9\n  - type: test-reload-broken\n")
    status, body = await gw.reload()
    assert status == 400 and "cannot open its resource" in body["error"]["message"]
    assert EVENTS == [("start", "probe-9"), ("close", "probe-9")]  # the half-started one is closed
    status, headers = await gw.complete()
    assert status == 200 and headers["x-probe"] == "probe-1"


async def test_a_rejected_reload_leaves_carried_over_filters_on_the_old_clusters(rig: tuple[Rig, Any]) -> None:
    gw, _ = rig
    generations = gw.gateway.app[GENERATIONS_KEY]  # type: ignore[union-attr]
    probe = generations.current.chain.filters[1]
    before = probe.services.clusters
    ports = gw.all_ports  # type: ignore[attr-defined]
    gw.write({"c": ports["c"]}, extra_filters="  - type: test-reload-probe\n    name: probe-1\n"
                                               "  - type: test-reload-broken\n")
    assert (await gw.reload())[0] == 400
    assert probe.name == "probe-1" and probe.services.clusters is before
    assert [e.id for e in gw.state.clusters.all_endpoints()] == ["a", "b"]


async def test_a_reload_whose_client_goes_away_still_completes(rig: tuple[Rig, Any]) -> None:
    """`kvgate serve` cancels a handler whose client disconnects; a reload must not stop
    half-way (new generation current but the config, feed and monitor of the old one)."""
    gw, _ = rig
    SLOW_START.clear()
    gw.write(extra_filters="  - type: test-reload-slow\n    name: slow-1\n")
    generations = gw.gateway.app[GENERATIONS_KEY]  # type: ignore[union-attr]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        request = asyncio.ensure_future(session.post(gw.url + "/admin/reload"))
        await wait_until(lambda: ("starting", "slow-1") in EVENTS, timeout=5, message="the reload began")
        request.cancel()  # the admin client goes away while the new filter is starting
        with pytest.raises(asyncio.CancelledError):
            await request
    await asyncio.sleep(0.05)  # the server notices the closed connection and cancels its handler
    assert generations.current.number == 0
    SLOW_START.set()
    await wait_until(lambda: generations.current.number == 1, timeout=5, message="the reload finished")
    assert [f.name for f in generations.current.chain.filters] == ["prompt", "slow-1", "access-log"]
    assert generations.static is not None and "slow-1" in [f.name for f in generations.static.filters]
    status, headers = await gw.complete()
    assert status == 200 and headers["x-probe"] == "slow-1"
    gw.write(extra_filters="  - type: test-reload-probe\n    name: probe-3\n")
    assert (await gw.reload())[0] == 200  # the lock was released
    assert (await gw.complete())[1]["x-probe"] == "probe-3"
