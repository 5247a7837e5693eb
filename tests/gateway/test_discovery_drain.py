"""Endpoints that leave drain: their in-flight streams finish, no new request goes there,
then they leave the prefix index and their KV-event subscription closes. And KV-event
subscriptions follow the endpoint set: a discovered sim-vllm feeds the index, and a
reload that adds a static endpoint with `kv_events:` subscribes it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from kvproto.kv_events import BlockStored
from kvproto.kv_events_pub import KVEventPublisher
from testbed.fake_openai import FakeBackend
from testbed.sim_vllm.cli import build_app, build_parser
from tests.conftest import wait_until
from tests.gateway.discovery_rig import Gateway, discovery_yaml, endpoints_file
from tests.gateway.dns_server import DnsServer
from tests.gateway.harness import start_backend


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    gw = Gateway(tmp_path / "gateway.yaml")
    yield gw
    await gw.close()


@pytest.fixture
async def publisher() -> AsyncIterator[KVEventPublisher]:
    async with KVEventPublisher() as pub:
        yield pub


def stored(first: int) -> BlockStored:
    """One full 16-token block (the gateway index's block size)."""
    return BlockStored((first,), None, tuple(range(first, first + 16)), 16)


async def test_a_leaving_endpoint_finishes_its_stream_then_leaves_the_index_and_the_feed(
        tmp_path: Path, gateway: Gateway, publisher: KVEventPublisher) -> None:
    fakes = {name: FakeBackend(name) for name in ("a", "b")}
    servers = {name: await start_backend(fake) for name, fake in fakes.items()}
    try:
        a_url, b_url = (f"http://127.0.0.1:{servers[n].port}" for n in ("a", "b"))
        entry_a = {"id": "a", "url": a_url, "kv_events": {"endpoint": f"tcp://127.0.0.1:{publisher.port}",
                                                          "replay_endpoint": f"tcp://127.0.0.1:{publisher.replay_port}"}}
        path = tmp_path / "endpoints.json"
        endpoints_file(path, [entry_a])
        await gateway.start(discovery_yaml(f"{{file: {{path: '{path}', interval: 50ms}}}}"))
        index, feed = gateway.state.prefix_index, gateway.state.kv_feed
        assert feed is not None and "a" in feed.subscribers
        publisher.publish([stored(1000)])
        await wait_until(lambda: index.stored_blocks("a") == 1, message="a's block indexed")
        await wait_until(lambda: gateway.healthy() == ["a"], message="a serves")

        gate = asyncio.Event()
        fakes["a"].stream_gate = gate
        async with aiohttp.ClientSession() as session:
            body = {"model": "m", "prompt": "hi", "stream": True}
            async with session.post(gateway.url + "/v1/completions", json=body) as resp:
                assert resp.headers["x-kvgate-endpoint"] == "a"
                first = await resp.content.readuntil(b"\n\n")
                endpoints_file(path, [{"id": "b", "url": b_url}])
                await wait_until(lambda: gateway.healthy() == ["b"], message="a left, b serves")
                assert gateway.generations.draining.snapshot() == [{"id": "a", "url": a_url, "inflight": 1}]
                assert "a" in feed.subscribers and index.stored_blocks("a") == 1  # not before it drained
                assert await gateway.complete(4) == [(200, "b")] * 4
                assert len(fakes["a"].requests) == 1  # only the stream in flight
                gate.set()
                rest = await resp.read()
        assert first.startswith(b"data: ") and rest.endswith(b"data: [DONE]\n\n")
        assert rest.count(b"data: ") == fakes["a"].stream_chunks  # every chunk after the first, and [DONE]
        await wait_until(lambda: gateway.generations.draining.snapshot() == [], message="a drained")
        assert "a" not in feed.subscribers and index.stored_blocks("a") == 0
        assert "a" not in (await gateway.status())["kv_events"]
        assert 'endpoint="a"' not in "\n".join(line for line in (await gateway.metrics()).splitlines()
                                               if line.startswith("kvgate_endpoint_healthy"))
    finally:
        for server in servers.values():
            await server.close()


@pytest.fixture
async def sim() -> AsyncIterator[tuple[TestServer, dict[str, int]]]:
    """An in-process sim-vllm publishing KV events on ports from the OS."""
    args = build_parser().parse_args(["--id", "sim", "--port", "0", "--prefill-rate", "1000000", "--decode-rate",
                                      "100000", "--base-latency-ms", "0", "--kv-events-port", "0",
                                      "--kv-events-replay-port", "0"])
    server = TestServer(build_app(args), host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/kvgate/kv-events") as r:
        events = await r.json()
    yield server, {"port": events["port"], "replay_port": events["replay_port"]}
    await server.close()


async def test_a_discovered_sim_vllm_feeds_the_prefix_index(
        gateway: Gateway, sim: tuple[TestServer, dict[str, int]]) -> None:
    server, events = sim
    dns = await DnsServer(records={("sim.test.", "A"): ["127.0.0.1"]}).start()
    try:
        discovery = (f"{{dns: {{name: sim.test., record: A, port: {server.port}, interval: 50ms, timeout: 300ms, "
                     f"nameservers: ['{dns.nameserver}']}}, template: {{kind: vllm, kv_events: "
                     f"{{port: {events['port']}, replay_port: {events['replay_port']}}}}}}}")
        await gateway.start(discovery_yaml(discovery))
        sim_id = f"127.0.0.1:{server.port}"
        await wait_until(lambda: gateway.healthy() == [sim_id], message="the sim serves")
        assert gateway.state.kv_feed is not None and sim_id in gateway.state.kv_feed.subscribers
        prompt = " ".join(f"word{i}" for i in range(80))  # well over one 16-token block
        async with aiohttp.ClientSession() as session:
            async with session.post(gateway.url + "/v1/completions",
                                    json={"model": "sim-vllm", "prompt": prompt, "max_tokens": 2}) as resp:
                assert resp.status == 200, await resp.text()
        await wait_until(lambda: gateway.state.prefix_index.stored_blocks(sim_id) >= 2,
                         message="the sim's BlockStored events indexed under its discovered id")
        assert (await gateway.status())["kv_events"][sim_id]["batches"] >= 1
    finally:
        dns.close()


async def test_a_reload_subscribes_a_new_static_endpoint_and_unsubscribes_a_removed_one(
        gateway: Gateway, publisher: KVEventPublisher) -> None:
    fake = FakeBackend("a")
    server = await start_backend(fake)
    try:
        url = f"http://127.0.0.1:{server.port}"
        base = f"""
server: {{port: 0}}
clusters:
  - name: llm
    endpoints:
      - {{id: a, url: "{url}"}}
{{extra}}
routes: [{{match: {{prefix: /v1/}}, cluster: llm}}]
"""
        await gateway.start(base.replace("{extra}", ""))
        feed = gateway.state.kv_feed
        assert feed is not None and feed.subscribers == {}
        publisher.publish([stored(7)])
        with_b = base.replace("{extra}", f'      - {{id: b, url: "{url}", kv_events: '
                                         f'{{endpoint: "tcp://127.0.0.1:{publisher.port}", '
                                         f'replay_endpoint: "tcp://127.0.0.1:{publisher.replay_port}"}}}}')
        await gateway.reload(with_b)
        assert "b" in feed.subscribers  # subscribed by the reload, not at the next restart
        await wait_until(lambda: gateway.state.prefix_index.stored_blocks("b") == 1,
                         message="b's published block (caught up through replay) indexed")
        await gateway.reload(base.replace("{extra}", ""))
        await wait_until(lambda: "b" not in feed.subscribers, message="b unsubscribed once drained")
        assert gateway.state.prefix_index.stored_blocks("b") == 0
    finally:
        await server.close()
