"""Endpoint discovery end to end: a gateway whose cluster follows a real DNS server on
127.0.0.1 (SRV and A records the test changes) or a watched file, in front of real
backends. New endpoints serve only after a health probe passed; endpoints that go
away leave; a resolver failure or a broken file keeps the last known set."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from testbed.fake_openai import FakeBackend
from testbed.procs import free_ports
from tests.conftest import wait_until
from tests.gateway.discovery_rig import Gateway, discovery_yaml, endpoints_file, write_atomically
from tests.gateway.dns_server import DnsServer
from tests.gateway.harness import start_backend

SRV = "_http._tcp.vllm.ns.svc.cluster.local."


@pytest.fixture
async def backends() -> AsyncIterator[dict[str, tuple[FakeBackend, TestServer]]]:
    fakes = {name: FakeBackend(name) for name in ("a", "b", "c")}
    servers = {name: (fake, await start_backend(fake)) for name, fake in fakes.items()}
    yield servers
    for _, server in servers.values():
        await server.close()


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    server = await DnsServer().start()
    yield server
    server.close()


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    gw = Gateway(tmp_path / "gateway.yaml")
    yield gw
    await gw.close()


def ep_id(server: TestServer) -> str:
    return f"127.0.0.1:{server.port}"


def srv_records(dns: DnsServer, servers: list[TestServer]) -> None:
    """SRV records naming each server as its own target (a pod), all at 127.0.0.1."""
    records: dict[tuple[str, str], list[str]] = {(SRV, "SRV"): [
        f"0 50 {s.port} pod-{s.port}.vllm.test." for s in servers]}
    records.update({(f"pod-{s.port}.vllm.test.", "A"): ["127.0.0.1"] for s in servers})
    dns.records = records


def srv_id(server: TestServer) -> str:
    """A discovered SRV endpoint's id: its target's name and port."""
    return f"pod-{server.port}.vllm.test:{server.port}"


def dns_discovery(dns: DnsServer, record: str = "SRV", name: str = SRV, port: int | None = None) -> str:
    port_field = f", port: {port}" if port is not None else ""
    return (f"{{dns: {{name: {name}, record: {record}{port_field}, interval: 50ms, timeout: 300ms, "
            f"nameservers: ['{dns.nameserver}']}}}}")


async def test_srv_answers_add_endpoints_after_a_health_probe_and_remove_them(
        dns_server: DnsServer, gateway: Gateway, backends: dict[str, tuple[FakeBackend, TestServer]]) -> None:
    (_, a), (_, b) = backends["a"], backends["b"]
    dns_server.additional = True  # as Kubernetes sends it
    srv_records(dns_server, [a])
    await gateway.start(discovery_yaml(dns_discovery(dns_server)))
    assert gateway.ids() == [srv_id(a)]  # the first answer is in before the gateway serves
    await wait_until(lambda: gateway.healthy() == [srv_id(a)], message="a passed its health probe")
    assert {who for _, who in await gateway.complete(3)} == {srv_id(a)}

    srv_records(dns_server, [a, b])
    await wait_until(lambda: gateway.healthy() == sorted([srv_id(a), srv_id(b)]), message="b added, then healthy")
    assert {who for _, who in await gateway.complete(4)} == {srv_id(a), srv_id(b)}

    srv_records(dns_server, [b])
    await wait_until(lambda: gateway.ids() == [srv_id(b)], message="a removed")
    assert {(status, who) for status, who in await gateway.complete(4)} == {(200, srv_id(b))}
    status = await gateway.status()
    llm = status["discovery"]["llm"]
    assert llm["source"] == f"dns SRV {SRV}" and llm["endpoints"] == [srv_id(b)]
    assert llm["last_error"] is None and llm["last_resolved_at"] > 0 and llm["changes"] >= 3
    await wait_until(lambda: gateway.generations.draining.snapshot() == [], message="a drained")
    changes = re.search(r'kvgate_discovery_changes_total\{cluster="llm"\} (\S+)', await gateway.metrics())
    assert changes is not None and float(changes.group(1)) >= 3


async def test_an_a_record_backend_appears_and_disappears(
        dns_server: DnsServer, gateway: Gateway, backends: dict[str, tuple[FakeBackend, TestServer]]) -> None:
    _, a = backends["a"]
    dns_server.records = {("other.test.", "A"): ["127.0.0.1"]}  # vllm.test. does not exist yet
    await gateway.start(discovery_yaml(dns_discovery(dns_server, "A", "vllm.test.", a.port)))
    assert gateway.ids() == []
    assert {status for status, _ in await gateway.complete(1)} == {503}
    dns_server.records[("vllm.test.", "A")] = ["127.0.0.1"]
    await wait_until(lambda: gateway.healthy() == [ep_id(a)], message="the A record's backend serves")
    assert await gateway.complete(2) == [(200, ep_id(a))] * 2
    del dns_server.records[("vllm.test.", "A")]  # NXDOMAIN: an answer, the service has no endpoint
    await wait_until(lambda: gateway.ids() == [], message="the backend left")
    assert (await gateway.status())["discovery"]["llm"]["last_error"] is None


async def test_a_watched_file_adds_and_removes_endpoints_and_a_broken_one_keeps_them(
        tmp_path: Path, gateway: Gateway, backends: dict[str, tuple[FakeBackend, TestServer]]) -> None:
    (_, a), (_, b) = backends["a"], backends["b"]
    path = tmp_path / "endpoints.json"
    endpoints_file(path, [{"id": "gpu-a", "url": f"http://127.0.0.1:{a.port}"}])
    await gateway.start(discovery_yaml(f"{{file: {{path: '{path}', interval: 50ms}}, template: {{kind: openai}}}}"))
    await wait_until(lambda: gateway.healthy() == ["gpu-a"], message="gpu-a serves")
    assert gateway.cluster.endpoint("gpu-a").kind == "openai"  # type: ignore[union-attr]

    endpoints_file(path, [{"id": "gpu-a", "url": f"http://127.0.0.1:{a.port}"}, {"url": f"http://127.0.0.1:{b.port}"}])
    await wait_until(lambda: gateway.healthy() == sorted(["gpu-a", ep_id(b)]), message="b added")
    assert {who for _, who in await gateway.complete(4)} == {"gpu-a", ep_id(b)}

    write_atomically(path, "endpoints: [{url: ftp://nowhere}]")
    async def failed_twice() -> bool:
        return bool((await gateway.status())["discovery"]["llm"]["errors"] >= 2)

    await wait_until(failed_twice, message="failed rounds counted")
    status = (await gateway.status())["discovery"]["llm"]
    assert "endpoints[0].url: must be an http(s) URL" in status["last_error"] and str(path) in status["last_error"]
    assert gateway.ids() == sorted(["gpu-a", ep_id(b)])  # the last known set stays

    endpoints_file(path, [{"url": f"http://127.0.0.1:{b.port}"}])
    await wait_until(lambda: gateway.ids() == [ep_id(b)], message="gpu-a removed")
    assert (await gateway.status())["discovery"]["llm"]["last_error"] is None
    assert {who for _, who in await gateway.complete(3)} == {ep_id(b)}


async def test_a_new_endpoint_that_fails_its_health_probe_is_never_picked(
        tmp_path: Path, gateway: Gateway, backends: dict[str, tuple[FakeBackend, TestServer]]) -> None:
    (_, a), (sick, b) = backends["a"], backends["b"]
    sick.healthy = False  # /health answers 503
    (closed_port,) = free_ports(1)  # nothing listens there: refused
    path = tmp_path / "endpoints.json"
    endpoints_file(path, [{"url": f"http://127.0.0.1:{a.port}"}])
    await gateway.start(discovery_yaml(f"{{file: {{path: '{path}', interval: 50ms}}}}"))
    await wait_until(lambda: gateway.healthy() == [ep_id(a)], message="a serves")
    endpoints_file(path, [{"url": f"http://127.0.0.1:{port}"} for port in (a.port, b.port, closed_port)])
    await wait_until(lambda: len(gateway.ids()) == 3, message="b and the closed port discovered")
    monitor = gateway.generations.monitor
    assert monitor is not None
    await wait_until(lambda: monitor.streaks.get(ep_id(b), 0) <= -2
                     and monitor.streaks.get(f"127.0.0.1:{closed_port}", 0) <= -2,
                     message="both probed, and failed, twice")
    assert await gateway.complete(6) == [(200, ep_id(a))] * 6
    assert sick.requests == []
    assert gateway.cluster.endpoint(f"127.0.0.1:{closed_port}").stats.requests == 0  # type: ignore[union-attr]
    sick.healthy = True
    await wait_until(lambda: ep_id(b) in gateway.healthy(), message="b recovers")
    assert ep_id(b) in {who for _, who in await gateway.complete(4)}


async def test_a_resolver_failure_keeps_the_endpoints_and_logs_once(
        dns_server: DnsServer, gateway: Gateway, backends: dict[str, tuple[FakeBackend, TestServer]],
        caplog: pytest.LogCaptureFixture) -> None:
    (_, a), (_, b) = backends["a"], backends["b"]
    srv_records(dns_server, [a, b])
    await gateway.start(discovery_yaml(dns_discovery(dns_server)))
    await wait_until(lambda: len(gateway.healthy()) == 2, message="both serve")
    caplog.set_level(logging.INFO, logger="kvgate.discovery")
    for mode in ("servfail", "drop"):
        dns_server.mode = mode
        queries = len(dns_server.queries)
        await wait_until(lambda q=queries: len(dns_server.queries) >= q + 3, message=f"rounds with {mode}")
        status = (await gateway.status())["discovery"]["llm"]
        assert status["last_error"] is not None and status["error_since"] is not None
        assert gateway.ids() == sorted([srv_id(a), srv_id(b)])
        assert {who for _, who in await gateway.complete(4)} == {srv_id(a), srv_id(b)}
    failures = [r for r in caplog.records if "failed, its last known 2 endpoints stay" in r.getMessage()]
    assert len(failures) == 2  # once per kind of failure, not once per round
    dns_server.mode = "answer"
    await wait_until(lambda: _last_error(gateway) is None,
                     message="the resolver answers again")
    assert any("answers again" in r.getMessage() for r in caplog.records)
    errors = re.search(r'kvgate_discovery_errors_total\{cluster="llm"\} (\S+)', await gateway.metrics())
    assert errors is not None and float(errors.group(1)) >= 4


def _last_error(gateway: Gateway) -> str | None:
    from gateway.discovery.watch import DISCOVERY_KEY

    assert gateway.server is not None
    return gateway.server.app[DISCOVERY_KEY].watches["llm"].status.last_error


async def test_a_reload_keeps_the_discovered_endpoints(
        dns_server: DnsServer, gateway: Gateway, backends: dict[str, tuple[FakeBackend, TestServer]]) -> None:
    (_, a), (_, b), (_, c) = backends["a"], backends["b"], backends["c"]
    srv_records(dns_server, [a, b])
    static = f'    endpoints: [{{id: static-c, url: "http://127.0.0.1:{c.port}"}}]'
    await gateway.start(discovery_yaml(dns_discovery(dns_server)))
    await wait_until(lambda: len(gateway.healthy()) == 2, message="both serve")
    before = {e.id: e for e in gateway.cluster.endpoints}
    answer = await gateway.reload(discovery_yaml(dns_discovery(dns_server), static))
    assert answer["endpoints_kept"] == sorted([srv_id(a), srv_id(b)])
    assert gateway.ids() == sorted([srv_id(a), srv_id(b), "static-c"])
    assert all(gateway.cluster.endpoint(i) is ep for i, ep in before.items())  # same objects: health kept
    # A changed discovery block: the last known endpoints stay until the new source answers.
    dns_server.records[("_other._tcp.test.", "SRV")] = [f"0 0 {b.port} pod-{b.port}.vllm.test."]
    await gateway.reload(discovery_yaml(dns_discovery(dns_server, name="_other._tcp.test."), static))
    await wait_until(lambda: gateway.ids() == sorted([srv_id(b), "static-c"]), message="the new source's answer")
    # Discovery gone from the config: so are the discovered endpoints.
    await gateway.reload(discovery_yaml("null", static))
    assert gateway.ids() == ["static-c"] and (await gateway.status())["discovery"] == {}


async def test_a_discovered_id_already_used_by_a_static_endpoint_is_skipped_and_shown(
        tmp_path: Path, gateway: Gateway, backends: dict[str, tuple[FakeBackend, TestServer]]) -> None:
    (_, a), (_, b) = backends["a"], backends["b"]
    path = tmp_path / "endpoints.yaml"
    write_atomically(path, f"- {{id: static-a, url: 'http://127.0.0.1:{b.port}'}}\n- {{url: 'http://127.0.0.1:{b.port}'}}\n")
    static = f'    endpoints: [{{id: static-a, url: "http://127.0.0.1:{a.port}"}}]'
    await gateway.start(discovery_yaml(f"{{file: {{path: '{path}', interval: 50ms}}}}", static))
    assert gateway.ids() == sorted(["static-a", ep_id(b)])
    assert gateway.cluster.endpoint("static-a").url == f"http://127.0.0.1:{a.port}"  # type: ignore[union-attr]
    status = (await gateway.status())["discovery"]["llm"]
    assert status["endpoints"] == [ep_id(b)]
    assert status["skipped"] == ["static-a: id already used by another endpoint"]


async def test_a_new_endpoint_is_probed_at_once_not_after_a_health_interval(
        tmp_path: Path, gateway: Gateway, backends: dict[str, tuple[FakeBackend, TestServer]]) -> None:
    """With checks an hour apart, only a probe made when the endpoint appears can admit it."""
    (_, a), (_, b) = backends["a"], backends["b"]
    path = tmp_path / "endpoints.json"
    endpoints_file(path, [{"url": f"http://127.0.0.1:{a.port}"}])
    text = discovery_yaml(f"{{file: {{path: '{path}', interval: 50ms}}}}").replace("interval: 100ms", "interval: 1h")
    await gateway.start(text.replace("metrics_interval: 100ms", "metrics_interval: 1h"))
    assert gateway.cluster.config.health_check.interval == 3600
    await wait_until(lambda: gateway.healthy() == [ep_id(a)], message="a probed at start")
    endpoints_file(path, [{"url": f"http://127.0.0.1:{s.port}"} for s in (a, b)])
    await wait_until(lambda: gateway.healthy() == sorted([ep_id(a), ep_id(b)]), message="b probed when it appeared")
