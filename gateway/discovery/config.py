"""`clusters[].discovery:`: where a cluster's endpoints come from besides `endpoints:`.

A leaf: imports only `kvkernel.decode` and the endpoint kinds of `gateway.endpoint_config`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from gateway.endpoint_config import EndpointKind
from kvkernel.decode import FieldError, Seconds

DnsRecord = Literal["A", "AAAA", "SRV"]


def parse_nameserver(text: str) -> tuple[str, int]:
    """`"10.0.0.10"`, `"127.0.0.1:5353"`, `"::1"` or `"[::1]:5353"` -> (address, port);
    ValueError if it is not an IP address with an optional port."""
    host, port = text, 53
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [IPv6]:PORT, got {text!r}")
        if rest:
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, raw_port = text.partition(":")
        port = _port(raw_port, text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected an IP address with an optional :PORT, got {text!r}") from None
    return host, port


def _port(raw: str, text: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"port must be in 1..65535, got {text!r}")
    return int(raw)


@dataclass(frozen=True, slots=True)
class DnsDiscoveryConfig:
    """`discovery.dns:` endpoints from DNS records, re-resolved every `interval`.

    SRV records (what a Kubernetes headless Service publishes for a named port, e.g.
    `_http._tcp.vllm.ns.svc.cluster.local`) give each endpoint's target and port; A and
    AAAA records give addresses, and `port` is the one port they all serve on."""

    name: str
    record: DnsRecord = "SRV"
    port: int | None = None
    interval: Seconds = 10.0
    timeout: Seconds = 2.0
    nameservers: list[str] | None = None  # IP[:PORT]; absent: the system resolver (/etc/resolv.conf)

    def __post_init__(self) -> None:
        if not self.name.strip(". "):
            raise FieldError("name", "must be a DNS name")
        if self.record == "SRV" and self.port is not None:
            raise FieldError("port", "SRV records carry each endpoint's port; give `port` only with A or AAAA")
        if self.record != "SRV" and self.port is None:
            raise FieldError("port", f"required with record: {self.record} (the port the addresses serve on)")
        if self.port is not None and not 0 < self.port < 65536:
            raise FieldError("port", f"must be in 1..65535, got {self.port}")
        if self.interval <= 0:
            raise FieldError("interval", "must be > 0")
        if self.timeout <= 0:
            raise FieldError("timeout", "must be > 0")
        if self.nameservers is not None:
            if not self.nameservers:
                raise FieldError("nameservers", "must list at least one nameserver (or be left out)")
            for i, text in enumerate(self.nameservers):
                try:
                    parse_nameserver(text)
                except ValueError as exc:
                    raise FieldError(f"nameservers[{i}]", str(exc)) from None


@dataclass(frozen=True, slots=True)
class FileDiscoveryConfig:
    """`discovery.file:` a YAML or JSON file listing endpoints, read again when it changes
    (its modification time and size are polled every `interval`)."""

    path: str
    interval: Seconds = 2.0

    def __post_init__(self) -> None:
        if not self.path:
            raise FieldError("path", "must name a file")
        if self.interval <= 0:
            raise FieldError("interval", "must be > 0")


@dataclass(frozen=True, slots=True)
class TemplateKVEvents:
    """`template.kv_events:` the engines' KV-event publisher ports; the host is the
    discovered endpoint's address."""

    port: int
    replay_port: int | None = None
    topic: str = ""

    def __post_init__(self) -> None:
        for name in ("port", "replay_port"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 65536:
                raise FieldError(name, f"must be in 1..65535, got {value}")


@dataclass(frozen=True, slots=True)
class EndpointTemplate:
    """`discovery.template:` what every discovered endpoint shares (a file entry may
    override `kind`, `scrape_metrics` and `kv_events` for itself)."""

    kind: EndpointKind = "vllm"
    scheme: Literal["http", "https"] = "http"
    scrape_metrics: bool = True
    kv_events: TemplateKVEvents | None = None


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """`clusters[].discovery:` exactly one source (`dns` or `file`) and the template."""

    dns: DnsDiscoveryConfig | None = None
    file: FileDiscoveryConfig | None = None
    template: EndpointTemplate = field(default_factory=EndpointTemplate)

    def __post_init__(self) -> None:
        if self.dns is not None and self.file is not None:
            raise FieldError("file", "give one source, `dns:` or `file:`, not both")
        if self.dns is None and self.file is None:
            raise ValueError("needs a source: `dns:` or `file:`")

    @property
    def interval(self) -> float:
        source = self.dns or self.file
        assert source is not None
        return source.interval

    def describe(self) -> str:
        if self.dns is not None:
            return f"dns {self.dns.record} {self.dns.name}"
        assert self.file is not None
        return f"file {self.file.path}"
