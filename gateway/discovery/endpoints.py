"""From what a source found to endpoint configs, and into the gateway config.

A discovered endpoint's id is `host:port`, stable across re-resolutions, so its
LMCache instance id (which defaults to the endpoint id), its health, breaker and
learned state carry over while it stays discovered. `host` is the SRV target's
name when it has one address (a StatefulSet pod's stable name, e.g.
`vllm-0.vllm-headless.ns.svc.cluster.local`), else the address (`[v6]` in
brackets). The URL and the KV-event sockets always use the address: the data
plane does not resolve names again. A file entry may name its own `id`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from gateway.config import GatewayConfig
from gateway.discovery.config import EndpointTemplate, TemplateKVEvents
from gateway.endpoint_config import EndpointConfig, KVEventsConfig
from kvkernel.decode import ConfigError, decode_dataclass


class DiscoveryError(Exception):
    """A source could not answer (resolver failure, unreadable or invalid file): the
    cluster keeps its last known endpoints."""


@dataclass(frozen=True, slots=True)
class Found:
    """One answer of a source: the endpoints, and what it skipped (and why)."""

    endpoints: list[EndpointConfig]
    skipped: list[str] = field(default_factory=list)


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _kv_events(template: TemplateKVEvents, host: str) -> KVEventsConfig:
    netloc = f"[{host}]" if ":" in host else host
    replay = f"tcp://{netloc}:{template.replay_port}" if template.replay_port is not None else None
    return KVEventsConfig(f"tcp://{netloc}:{template.port}", replay, template.topic)


def address_endpoint(template: EndpointTemplate, address: str, port: int, name: str | None = None) -> EndpointConfig:
    """The endpoint serving at `address:port`, as the template describes it; its id is
    `name:port` when a name is given, else `address:port`."""
    netloc = host_port(address, port)
    kv_events = _kv_events(template.kv_events, address) if template.kv_events is not None else None
    return EndpointConfig(host_port(name, port) if name else netloc, f"{template.scheme}://{netloc}", template.kind,
                          scrape_metrics=template.scrape_metrics, kv_events=kv_events)


def file_endpoints(data: Any, template: EndpointTemplate) -> list[EndpointConfig]:
    """The endpoints a discovery file lists: a list of entries, or `{endpoints: [...]}`.
    An entry has the fields of a static endpoint; `id` defaults to `host:port`, and
    `kind`, `scrape_metrics` and `kv_events` to the template's. ConfigError names the path."""
    path = ""
    if isinstance(data, Mapping):
        if set(data) != {"endpoints"}:
            raise ConfigError("", "expected a list of endpoints, or a mapping with only `endpoints:`")
        data, path = data["endpoints"], "endpoints"
    if data is None:
        data = []
    if not isinstance(data, list):
        raise ConfigError(path, "expected a list of endpoints")
    endpoints: list[EndpointConfig] = []
    seen: set[str] = set()
    for i, raw in enumerate(data):
        ep = file_endpoint(raw, template, f"{path}[{i}]")
        if ep.id in seen:
            raise ConfigError(f"{path}[{i}].id", f"duplicate endpoint id {ep.id!r}")
        seen.add(ep.id)
        endpoints.append(ep)
    return endpoints


def file_endpoint(raw: Any, template: EndpointTemplate, path: str) -> EndpointConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(path, "expected a mapping with `url` (and optionally id, kind, kv_events, ...)")
    data = dict(raw)
    data.setdefault("kind", template.kind)
    data.setdefault("scrape_metrics", template.scrape_metrics)
    address = _address(data.get("url"))
    # An entry whose url is bad gets a placeholder id: the url's own error is reported.
    data.setdefault("id", host_port(*address) if address is not None else "-")
    if "kv_events" not in data and template.kv_events is not None and address is not None:
        kv = _kv_events(template.kv_events, address[0])
        data["kv_events"] = {"endpoint": kv.endpoint, "replay_endpoint": kv.replay_endpoint, "topic": kv.topic}
    return decode_dataclass(EndpointConfig, data, path)


def _address(url: object) -> tuple[str, int] | None:
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    return (parts.hostname, port) if parts.hostname and port else None


def merge_discovered(config: GatewayConfig, discovered: Mapping[str, Sequence[EndpointConfig]]
                     ) -> tuple[GatewayConfig, dict[str, list[str]]]:
    """`config` with each discovery cluster's endpoints = its static ones + the discovered
    ones. A discovered endpoint whose id is already used (by a static endpoint, or by an
    earlier cluster's discovery) is left out: returned per cluster as skipped ids."""
    used = {ep.id for c in config.clusters for ep in c.endpoints}
    skipped: dict[str, list[str]] = {}
    clusters = []
    for cluster in config.clusters:
        found = discovered.get(cluster.name) if cluster.discovery is not None else None
        if not found:
            clusters.append(cluster)
            continue
        extra = []
        for ep in found:
            if ep.id in used:
                skipped.setdefault(cluster.name, []).append(ep.id)
                continue
            used.add(ep.id)
            extra.append(ep)
        clusters.append(dataclasses.replace(cluster, endpoints=[*cluster.endpoints, *extra]))
    return dataclasses.replace(config, clusters=clusters), skipped
