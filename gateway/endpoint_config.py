"""An upstream endpoint's config (`clusters[].endpoints[]`, and what discovery builds).

A leaf: imports only `kvkernel.decode`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from kvkernel.decode import FieldError

EndpointKind = Literal["mlx", "vllm", "openai"]


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    """`kv_events:` of an endpoint: the engine's KV-event publisher (vLLM's
    `--kv-events-config` `endpoint` / `replay_endpoint`, as the gateway reaches them)."""

    endpoint: str  # tcp://host:port of the PUB socket
    replay_endpoint: str | None = None  # tcp://host:port of the ROUTER replay socket
    topic: str = ""

    def __post_init__(self) -> None:
        for name in ("endpoint", "replay_endpoint"):
            value = getattr(self, name)
            if value is not None and not _zmq_tcp(value):
                raise FieldError(name, f"must be tcp://HOST:PORT, got {value!r}")


def _zmq_tcp(url: str) -> bool:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return parts.scheme == "tcp" and bool(parts.hostname) and port is not None and parts.path in ("", "/")


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    id: str
    url: str
    kind: EndpointKind = "vllm"
    lmcache_instance_id: str | None = None
    scrape_metrics: bool = True
    kv_events: KVEventsConfig | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise FieldError("id", "must not be empty")
        try:
            parts = urlsplit(self.url)
            parts.port  # noqa: B018 - raises ValueError for a bad or out-of-range port
        except ValueError as exc:
            raise FieldError("url", f"invalid URL {self.url!r}: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FieldError("url", f"must be an http(s) URL with a host, got {self.url!r}")
        if parts.path not in ("", "/"):
            raise FieldError("url", f"must not carry a path (the request path is appended), got {self.url!r}")

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")
