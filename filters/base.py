"""The filter contract: three async hooks with pass-through defaults.

`on_request` runs in config order and may STOP with a local reply; `on_response`
runs in reverse order once the response head is known (upstream or local, before
any byte reaches the client); `on_complete` runs in reverse order for every
request, whatever happened. Filters reach cluster state only through `Services`,
and declare the typed state they need (`consumes`) and publish (`produces`).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import aiohttp
import httpx

from kvkernel.context import RequestContext, StateKey
from kvkernel.reply import LocalReply, ResponseHead, error_reply

__all__ = ["CONTINUE", "Action", "BackgroundSubmitter", "ClusterDirectory", "EndpointView", "Filter",
           "FilterResult", "LocalReply", "PrefixIndexView", "ResponseHead", "Services", "stop"]


class Action(enum.Enum):
    CONTINUE = "continue"
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class FilterResult:
    action: Action
    reply: LocalReply | None = None


CONTINUE = FilterResult(Action.CONTINUE)


def stop(status: int, message: str, *, code: str | None = None, param: str | None = None,
         headers: Mapping[str, str] | None = None) -> FilterResult:
    """STOP the chain with an OpenAI-shaped error reply."""
    return FilterResult(Action.STOP, error_reply(status, message, code=code, param=param, headers=headers))


class EndpointView(Protocol):
    """What a filter may read about an upstream endpoint."""

    @property
    def id(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def lmcache_instance_id(self) -> str: ...
    @property
    def inflight(self) -> int: ...
    @property
    def kv_cache_usage(self) -> float | None: ...
    @property
    def num_requests_waiting(self) -> int | None: ...
    @property
    def has_event_feed(self) -> bool: ...  # the engine publishes KV events the gateway follows

    def eligible(self) -> bool: ...


class ClusterDirectory(Protocol):
    def endpoints(self, cluster: str) -> Sequence[EndpointView]: ...
    def cluster_names(self) -> Sequence[str]: ...


class PrefixIndexView(Protocol):
    """The gateway's in-process prefix index (engine KV events, prefixes in flight,
    learned from traffic), at block granularity: matched tokens per endpoint id."""

    def match(self, keys: Sequence[int], endpoints: Iterable[str]) -> dict[str, int]: ...


class BackgroundSubmitter(Protocol):
    def submit(self, name: str, job: Callable[[], Awaitable[object]]) -> bool: ...


@dataclass(slots=True)
class Services:
    """The small interface the app hands every filter."""

    clusters: ClusterDirectory
    background: BackgroundSubmitter
    http: httpx.AsyncClient
    metrics: Any = None  # prometheus_client.CollectorRegistry
    gateway_load: Callable[[], float] = lambda: 0.0  # in-flight / capacity, 0..1+
    prefix_index: PrefixIndexView | None = None
    session: aiohttp.ClientSession | None = None  # the data plane's pooled session (cheaper per call)


class Filter:
    """Base class. Subclasses set `type_name` via `@register` and `Config` (a frozen
    dataclass decoded strictly from the filter's `config:` mapping)."""

    type_name: ClassVar[str] = ""
    Config: ClassVar[type[Any] | None] = None
    # Typed state this filter needs from earlier filters, and what it writes.
    consumes: ClassVar[tuple[StateKey[Any], ...]] = ()
    produces: ClassVar[tuple[StateKey[Any], ...]] = ()
    # Loggers (access-log) set this: their `on_complete` runs after every other filter's,
    # so they see what the others recorded on the way out, wherever they sit in the chain.
    completes_last: ClassVar[bool] = False
    # On a config reload an unchanged filter is carried over (its learned state kept);
    # filters that read something outside the config at start (a keys file) set this
    # to be rebuilt and restarted instead.
    restart_on_reload: ClassVar[bool] = False

    def __init__(self, config: Any, name: str, services: Services) -> None:
        self.config = config
        self.name = name
        self.services = services

    async def start(self) -> None:
        """Open resources (called once, inside the app's cleanup context)."""

    async def close(self) -> None:
        """Release resources; must not raise."""

    async def on_request(self, ctx: RequestContext) -> FilterResult:
        return CONTINUE

    async def on_response(self, ctx: RequestContext, head: ResponseHead) -> None:
        return None

    async def on_complete(self, ctx: RequestContext) -> None:
        return None
