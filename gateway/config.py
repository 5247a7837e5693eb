"""The gateway's configuration: frozen dataclasses decoded strictly from YAML.

Filter configs are decoded by the filter registry (each filter owns its config
class); here they stay raw (`FilterSpec.config`). Imports only the leaves
`kvkernel.decode` and `kvkernel.breaker`, the route configs of `gateway.routes`
(itself a leaf), and the config classes of `gateway.outlier` and `gateway.admission`
(themselves importing only the kernel), and the leaves `gateway.endpoint_config` and
`gateway.discovery.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.admission import LimitsConfig
from gateway.discovery.config import DiscoveryConfig
from gateway.endpoint_config import EndpointConfig as EndpointConfig  # re-exported, as are the two below
from gateway.endpoint_config import EndpointKind as EndpointKind
from gateway.endpoint_config import KVEventsConfig as KVEventsConfig
from gateway.outlier import OutlierDetectionConfig
from gateway.routes import RouteConfig, RouteMatch, check_routes  # noqa: F401 - RouteMatch re-exported
from kvkernel.breaker import CircuitBreakerConfig
from kvkernel.decode import Bytes, ConfigError, FieldError, Seconds, decode_dataclass, load_yaml


@dataclass(frozen=True, slots=True)
class AdminListenerConfig:
    """`server.admin:` a separate listener for the admin endpoints (metrics, status, reload)."""

    port: int
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise FieldError("port", f"must be in 0..65535, got {self.port}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8888
    workers: int = 1
    max_body_bytes: Bytes = 8 * 1024 * 1024
    debug_headers: bool = False
    drain_timeout: Seconds = 30.0
    background_queue_size: int = 1024
    admin: AdminListenerConfig | None = None  # admin endpoints on their own listener
    admin_key_env: str | None = None  # env var holding the key the admin endpoints require
    reuse_port: bool = False  # share the port with another gateway already serving it
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log_format: Literal["text", "json"] = "text"  # application logs; `kvgate serve --log-format` overrides

    def __post_init__(self) -> None:
        if self.admin is not None and self.admin.port and self.admin.port == self.port \
                and self.admin.host == self.host:
            raise FieldError("admin.port", f"must differ from server.port ({self.port})")
        if self.admin_key_env is not None and not self.admin_key_env:
            raise FieldError("admin_key_env", "must name an environment variable")
        if not 0 <= self.port <= 65535:
            raise FieldError("port", f"must be in 0..65535, got {self.port}")
        if self.workers < 1:
            raise FieldError("workers", f"must be >= 1, got {self.workers}")
        if self.max_body_bytes < 1:
            raise FieldError("max_body_bytes", f"must be >= 1 byte, got {self.max_body_bytes}")
        if self.background_queue_size < 1:
            raise FieldError("background_queue_size", f"must be >= 1, got {self.background_queue_size}")


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    path: str = "/health"
    interval: Seconds = 5.0
    timeout: Seconds = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise FieldError("path", f"must start with '/', got {self.path!r}")
        if self.interval <= 0:
            raise FieldError("interval", "must be > 0")
        if self.timeout <= 0:
            raise FieldError("timeout", "must be > 0")
        for name in ("unhealthy_threshold", "healthy_threshold"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_attempts: int = 2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise FieldError("max_attempts", f"must be >= 1, got {self.max_attempts}")


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    """`connect`: TCP connect. `first_byte`: the response head of a streamed request.
    `idle`: the longest silence between two chunks of a streamed response. `total`: a
    whole non-streamed response (head and body), which arrives only after generation."""

    connect: Seconds = 1.0
    first_byte: Seconds = 60.0
    idle: Seconds = 60.0
    total: Seconds = 600.0

    def __post_init__(self) -> None:
        for name in ("connect", "first_byte", "idle", "total"):  # aiohttp reads 0 as "no timeout at all"
            if getattr(self, name) <= 0:
                raise FieldError(name, "must be > 0")


@dataclass(frozen=True, slots=True)
class BackendAuthConfig:
    """`backend_auth:` of a cluster: a credential the gateway sends to its backends,
    taken from an environment variable (never written in the YAML)."""

    value_env: str
    header: str = "Authorization"

    def __post_init__(self) -> None:
        if not self.value_env:
            raise FieldError("value_env", "must name an environment variable")
        if not self.header or any(c in self.header for c in " :\r\n"):
            raise FieldError("header", f"must be a header name, got {self.header!r}")


@dataclass(frozen=True, slots=True)
class PickerSpec:
    """`picker:` of a cluster; `config` is decoded by the picker's own config class."""

    type: str
    config: Any = None


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    name: str
    endpoints: list[EndpointConfig] = field(default_factory=list)  # static; discovery adds its own
    discovery: DiscoveryConfig | None = None
    lb_policy: str | None = None  # short form of `picker: {type: NAME}`
    picker: PickerSpec | None = None
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    outlier_detection: OutlierDetectionConfig = field(default_factory=OutlierDetectionConfig)
    max_inflight_per_endpoint: int | None = None  # beyond it an endpoint is not eligible
    cache_aware: Any = None  # the cache_aware picker's config in the short form (raw)
    metrics_interval: Seconds = 2.0
    forward_client_auth: bool = False  # forward the client's Authorization / x-api-key
    backend_auth: BackendAuthConfig | None = None

    def __post_init__(self) -> None:
        if not self.endpoints and self.discovery is None:
            raise FieldError("endpoints", "a cluster needs at least one endpoint (or a `discovery:` block)")
        if self.metrics_interval <= 0:
            raise FieldError("metrics_interval", "must be > 0")
        if self.max_inflight_per_endpoint is not None and self.max_inflight_per_endpoint < 1:
            raise FieldError("max_inflight_per_endpoint", f"must be >= 1, got {self.max_inflight_per_endpoint}")
        if self.lb_policy is not None and self.picker is not None:
            raise FieldError("picker", "give either `lb_policy` (short form) or `picker`, not both")
        seen: set[str] = set()
        for i, ep in enumerate(self.endpoints):
            if ep.id in seen:
                raise FieldError(f"endpoints[{i}].id", f"duplicate endpoint id {ep.id!r}")
            seen.add(ep.id)


@dataclass(frozen=True, slots=True)
class FilterSpec:
    """One entry of `filters:`; `config` is decoded by the filter's own config class."""

    type: str
    name: str | None = None
    config: Any = None


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    clusters: list[ClusterConfig]
    routes: list[RouteConfig]
    server: ServerConfig = field(default_factory=ServerConfig)
    filters: list[FilterSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        names: set[str] = set()
        endpoint_ids: set[str] = set()
        for i, cluster in enumerate(self.clusters):
            if cluster.name in names:
                raise FieldError(f"clusters[{i}].name", f"duplicate cluster name {cluster.name!r}")
            names.add(cluster.name)
            for j, ep in enumerate(cluster.endpoints):
                if ep.id in endpoint_ids:
                    raise FieldError(f"clusters[{i}].endpoints[{j}].id", f"endpoint id {ep.id!r} used twice")
                endpoint_ids.add(ep.id)
        for i, route in enumerate(self.routes):
            if route.cluster not in names:
                raise FieldError(f"routes[{i}].cluster", f"unknown cluster {route.cluster!r} (known: {sorted(names)})")
        check_routes(self.routes)

    def cluster(self, name: str) -> ClusterConfig:
        return next(c for c in self.clusters if c.name == name)


def parse_config(data: Any) -> GatewayConfig:
    """Decode already-parsed YAML data; raises ConfigError naming the YAML path."""
    if not isinstance(data, dict):
        raise ConfigError("", "the config file must be a YAML mapping with server/clusters/routes/filters")
    return decode_dataclass(GatewayConfig, data, "")


def load_config_text(text: str, source: str = "<config>") -> GatewayConfig:
    return parse_config(load_yaml(text, source))


def load_config(path: str | Path) -> GatewayConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"config file {path} is not UTF-8 text (bad byte at offset {exc.start})") from None
    return load_config_text(text, str(path))
