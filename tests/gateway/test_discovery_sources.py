"""Discovery sources on their own: DNS through a real DNS server on 127.0.0.1 that the
test controls, files on disk, and the `discovery:` config's YAML-path errors."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config import load_config_text
from gateway.discovery.config import DnsDiscoveryConfig, EndpointTemplate, FileDiscoveryConfig, TemplateKVEvents
from gateway.discovery.dns import DnsSource
from gateway.discovery.endpoints import DiscoveryError, merge_discovered
from gateway.discovery.file import FileSource
from gateway.endpoint_config import EndpointConfig, KVEventsConfig
from kvkernel.decode import ConfigError
from tests.gateway.dns_server import DnsServer

SRV_NAME = "_http._tcp.vllm.ns.svc.cluster.local."


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    server = await DnsServer().start()
    yield server
    server.close()


def dns_source(server: DnsServer, record: str = "SRV", port: int | None = None, name: str = SRV_NAME,
               template: EndpointTemplate | None = None) -> DnsSource:
    config = DnsDiscoveryConfig(name, record, port, timeout=0.3, nameservers=[server.nameserver])  # type: ignore[arg-type]
    return DnsSource(config, template or EndpointTemplate())


@pytest.mark.parametrize("additional", [True, False], ids=["targets-in-additional", "targets-looked-up"])
async def test_srv_gives_one_endpoint_per_target_and_port(dns_server: DnsServer, additional: bool) -> None:
    dns_server.additional = additional
    dns_server.records = {(SRV_NAME, "SRV"): ["0 50 8001 pod-a.vllm.test.", "0 50 8002 pod-b.vllm.test."],
                          ("pod-a.vllm.test.", "A"): ["127.0.0.1"], ("pod-b.vllm.test.", "A"): ["127.0.0.1"]}
    template = EndpointTemplate(kind="vllm", kv_events=TemplateKVEvents(5557, 5558, "kv"))
    found = await dns_source(dns_server, template=template).find()
    # Named by target (a StatefulSet pod's stable name), reached at the address.
    assert [(e.id, e.url, e.kind) for e in found.endpoints] == [
        ("pod-a.vllm.test:8001", "http://127.0.0.1:8001", "vllm"),
        ("pod-b.vllm.test:8002", "http://127.0.0.1:8002", "vllm")]
    assert found.endpoints[0].kv_events == KVEventsConfig("tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558", "kv")
    looked_up = {q for q in dns_server.queries if q[1] == "A"}
    assert looked_up == (set() if additional else {("pod-a.vllm.test.", "A"), ("pod-b.vllm.test.", "A")})


async def test_an_srv_target_that_does_not_resolve_is_skipped_and_said_so(dns_server: DnsServer) -> None:
    dns_server.records = {(SRV_NAME, "SRV"): ["0 0 8001 pod-a.test.", "0 0 8002 gone.test."],
                          ("pod-a.test.", "A"): ["127.0.0.1"]}
    found = await dns_source(dns_server).find()
    assert [e.id for e in found.endpoints] == ["pod-a.test:8001"]
    assert len(found.skipped) == 1 and "gone.test." in found.skipped[0]
    dns_server.records = {(SRV_NAME, "SRV"): ["0 0 8002 gone.test."]}
    with pytest.raises(DiscoveryError, match="no target resolved"):  # nothing left: keep what was known
        await dns_source(dns_server).find()


async def test_an_srv_target_with_several_addresses_gives_an_endpoint_per_address(dns_server: DnsServer) -> None:
    dns_server.records = {(SRV_NAME, "SRV"): ["0 0 8001 multi.test."], ("multi.test.", "A"): ["127.0.0.1",
                                                                                             "127.0.0.2"]}
    found = await dns_source(dns_server).find()
    assert [(e.id, e.url) for e in found.endpoints] == [("127.0.0.1:8001", "http://127.0.0.1:8001"),
                                                        ("127.0.0.2:8001", "http://127.0.0.2:8001")]


async def test_a_and_aaaa_records_use_the_configured_port(dns_server: DnsServer) -> None:
    dns_server.records = {("vllm.test.", "A"): ["127.0.0.1"], ("vllm.test.", "AAAA"): ["::1"]}
    a = await dns_source(dns_server, "A", 8000, "vllm.test.").find()
    assert [(e.id, e.url) for e in a.endpoints] == [("127.0.0.1:8000", "http://127.0.0.1:8000")]
    template = EndpointTemplate(scheme="https", kv_events=TemplateKVEvents(5557))
    aaaa = await dns_source(dns_server, "AAAA", 8000, "vllm.test.", template).find()
    assert [(e.id, e.url) for e in aaaa.endpoints] == [("[::1]:8000", "https://[::1]:8000")]
    assert aaaa.endpoints[0].kv_events == KVEventsConfig("tcp://[::1]:5557")


async def test_an_empty_answer_is_an_answer(dns_server: DnsServer) -> None:
    """NXDOMAIN, or a name without records of the type: zero endpoints (scaled to zero)."""
    dns_server.records = {("vllm.test.", "AAAA"): ["::1"]}
    for name in ("vllm.test.", "missing.test."):
        found = await dns_source(dns_server, "A", 8000, name).find()
        assert found.endpoints == [] and found.skipped


@pytest.mark.parametrize("mode, message", [("servfail", "SERVFAIL"), ("drop", "timed out")])
async def test_a_resolver_failure_is_an_error(dns_server: DnsServer, mode: str, message: str) -> None:
    dns_server.records = {("vllm.test.", "A"): ["127.0.0.1"]}
    dns_server.mode = mode
    with pytest.raises(DiscoveryError, match=message):
        await dns_source(dns_server, "A", 8000, "vllm.test.").find()


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomically, as the docs ask


async def test_a_file_lists_endpoints_with_template_defaults(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    _write(path, """
endpoints:
  - {url: "http://127.0.0.1:8001"}
  - {id: gpu-b, url: "http://127.0.0.1:8002", kind: openai, kv_events: {endpoint: "tcp://127.0.0.1:6000"}}
""")
    template = EndpointTemplate(kind="mlx", kv_events=TemplateKVEvents(5557))
    source = FileSource(FileDiscoveryConfig(str(path)), template)
    found = await source.find()
    assert [(e.id, e.kind, e.kv_events) for e in found.endpoints] == [
        ("127.0.0.1:8001", "mlx", KVEventsConfig("tcp://127.0.0.1:5557")),
        ("gpu-b", "openai", KVEventsConfig("tcp://127.0.0.1:6000"))]
    _write(path, '[{"url": "http://127.0.0.1:8003"}]')  # JSON, a bare list
    assert [e.id for e in (await source.find()).endpoints] == ["127.0.0.1:8003"]


@pytest.mark.parametrize("text, message", [
    ("endpoints:\n  - {url: http://127.0.0.1:1}\n  - {url: ftp://x}\n", "endpoints[1].url: must be an http(s) URL"),
    ("- {url: 'http://127.0.0.1:1', colour: red}\n", "[0].colour: unknown key"),
    ("- {url: 'http://127.0.0.1:1'}\n- {url: 'http://127.0.0.1:1'}\n", "[1].id: duplicate endpoint id"),
    ("endpoints: [\n", "invalid YAML"),
    ("hosts: []\n", "expected a list of endpoints"),
])
async def test_an_invalid_file_is_an_error_naming_the_path(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "endpoints.yaml"
    _write(path, text)
    with pytest.raises(DiscoveryError) as caught:
        await FileSource(FileDiscoveryConfig(str(path)), EndpointTemplate()).find()
    assert message in str(caught.value) and str(path) in str(caught.value)


async def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DiscoveryError, match="cannot read"):
        await FileSource(FileDiscoveryConfig(str(tmp_path / "nope.yaml")), EndpointTemplate()).find()


def _cluster_yaml(discovery: str, endpoints: str = "") -> str:
    return f"""
clusters:
  - name: llm
    discovery: {discovery}
{endpoints}
routes: [{{match: {{prefix: /v1/}}, cluster: llm}}]
"""


@pytest.mark.parametrize("discovery, message", [
    ("{dns: {name: vllm.test, record: A}}", "clusters[0].discovery.dns.port: required with record: A"),
    ("{dns: {name: _http._tcp.x, port: 80}}", "clusters[0].discovery.dns.port: SRV records carry"),
    ("{dns: {name: x, record: MX}}", "clusters[0].discovery.dns.record: must be one of"),
    ("{dns: {name: x, nameservers: ['dns.local:53']}}", "clusters[0].discovery.dns.nameservers[0]: expected an IP"),
    ("{dns: {name: x, interval: soon}}", "clusters[0].discovery.dns.interval: expected a duration"),
    ("{file: {path: e.yaml, interval: 0s}}", "clusters[0].discovery.file.interval: must be > 0"),
    ("{file: {path: e.yaml}, dns: {name: x}}", "clusters[0].discovery.file: give one source"),
    ("{}", "clusters[0].discovery: needs a source"),
    ("{file: {path: e.yaml}, template: {kind: tgi}}", "clusters[0].discovery.template.kind: must be one of"),
    ("{file: {path: e.yaml}, template: {kv_events: {port: 70000}}}",
     "clusters[0].discovery.template.kv_events.port: must be in 1..65535"),
    ("{file: {path: e.yaml}, template: {url: x}}", "clusters[0].discovery.template.url: unknown key"),
])
def test_discovery_config_errors_name_the_yaml_path(discovery: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text(_cluster_yaml(discovery))
    assert str(caught.value).startswith(message), str(caught.value)


def test_a_cluster_needs_endpoints_or_discovery() -> None:
    with pytest.raises(ConfigError, match=r"clusters\[0\].endpoints: a cluster needs at least one endpoint"):
        load_config_text("clusters: [{name: llm}]\nroutes: [{match: {prefix: /}, cluster: llm}]")
    config = load_config_text(_cluster_yaml(
        "{dns: {name: _http._tcp.vllm.ns.svc.cluster.local, nameservers: ['127.0.0.1:5353', '[::1]:53']}}"))
    dns = config.clusters[0].discovery.dns  # type: ignore[union-attr]
    assert dns is not None and dns.record == "SRV" and dns.interval == 10.0 and dns.timeout == 2.0


def test_merging_skips_discovered_ids_already_in_use() -> None:
    config = load_config_text("""
clusters:
  - name: llm
    endpoints: [{id: "127.0.0.1:8001", url: "http://127.0.0.1:8001"}]
    discovery: {file: {path: e.yaml}}
  - name: other
    discovery: {file: {path: f.yaml}}
routes: [{match: {prefix: /}, cluster: llm}]
""")
    found = [EndpointConfig("127.0.0.1:8001", "http://127.0.0.1:8001"), EndpointConfig("127.0.0.1:8002",
                                                                                       "http://127.0.0.1:8002")]
    merged, skipped = merge_discovered(config, {"llm": found, "other": found[1:]})
    assert [e.id for e in merged.cluster("llm").endpoints] == ["127.0.0.1:8001", "127.0.0.1:8002"]
    assert merged.cluster("other").endpoints == []
    assert skipped == {"llm": ["127.0.0.1:8001"], "other": ["127.0.0.1:8002"]}


DOCS = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("doc, heading", [(DOCS, "## Endpoint discovery"), (README, "#### Endpoint discovery")])
def test_the_documented_discovery_config_is_valid(doc: Path, heading: str) -> None:
    text = doc.read_text().split(heading, 1)[1]
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = load_config_text(block + "routes: [{match: {prefix: /v1/}, cluster: llm}]\n", str(doc))
    discovery = config.clusters[0].discovery
    assert discovery is not None and discovery.dns is not None and discovery.dns.record == "SRV"
    assert discovery.template.kv_events == TemplateKVEvents(5557, 5558)
