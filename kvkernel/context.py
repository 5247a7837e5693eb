"""The per-request context every stage shares, and the typed keys of per-request state.

The context holds what the gateway itself knows about a request (route, body,
the upstream exchange, timings). What filters and pickers learn travels through
typed keys (`StateKey`, in the spirit of aiohttp's `RequestKey`): a producer
writes `ctx[KEY] = value`, a consumer reads `ctx.get(KEY)`; nothing is parsed
back from strings. `log_fields` is write-only extra data for the access log.

A leaf module: imports nothing else from the project.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

from aiohttp import web

T = TypeVar("T")
D = TypeVar("D")


class StateKey(Generic[T]):
    """A typed key for per-request state. Two keys are the same key only if they are
    the same object, so modules can keep private state under keys of their own."""

    __slots__ = ("name", "type")

    def __init__(self, name: str, type_: Any) -> None:
        self.name = name
        self.type = type_

    def __repr__(self) -> str:
        return f"<StateKey {self.name}>"


@dataclass(slots=True)
class Usage:
    """Token usage the backend reported (parsed from the response's `usage`)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None


class DecisionKind(enum.Enum):
    """Why an endpoint was chosen (metrics and logs render the value)."""

    PREFERRED = "preferred"  # the pre-pick step honoured the chain's preferred endpoint
    CACHE_HIT = "cache_hit"  # the endpoint holding the longest cached prefix won
    CACHE_OVERRIDDEN = "cache_hit_overridden_by_load"  # a better-cached endpoint lost to load
    BALANCE = "balance"  # the balance guard chose the least loaded endpoint
    NO_HINT = "no_hint_least_load"  # nothing cached anywhere: least load won
    POLICY = "lb"  # a load-balancing picker without cache knowledge
    FAILOVER = "failover"  # a later attempt after a failed one
    LOCAL_REPLY = "local_reply"  # nothing was forwarded


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    kind: DecisionKind
    picker: str = ""
    reason: str = ""
    attempt: int = 1

    def render(self) -> str:
        """The access log's `decision`: the kind, qualified by the picker for plain
        load balancing and fail-over (`lb:round_robin`, `failover:cache_aware`)."""
        value = _KIND_VALUES[self.kind]  # a dict lookup: an enum's `.value` is a slow descriptor
        if self.picker and self.kind in _QUALIFIED:
            return f"{value}:{self.picker}"
        return value


_KIND_VALUES = {kind: kind.value for kind in DecisionKind}
_QUALIFIED = frozenset({DecisionKind.POLICY, DecisionKind.FAILOVER})


@dataclass(slots=True)
class RequestContext:
    """Per-request state owned by one exchange; see the module docstring."""

    request_id: str
    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)  # the client's, read-only
    remote: str | None = None  # the client's address (the peer of the connection)
    started: float = field(default_factory=time.perf_counter)
    received_at: float = field(default_factory=time.time)
    route: str | None = None
    cluster: str | None = None
    body: bytes = b""
    json: dict[str, Any] | None = None
    model: str | None = None  # the body's `model` as the client sent it (before any rewrite)
    stream: bool = False
    # The upstream exchange (filled by the proxy step).
    endpoint: str | None = None
    attempts: int = 0
    status: int | None = None
    bytes_out: int = 0
    ttfb_ms: float | None = None
    latency_ms: float | None = None
    error: str | None = None
    decision: RoutingDecision | None = None
    scores: dict[str, float] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    filter_ms: dict[str, float] = field(default_factory=dict)
    log_fields: dict[str, Any] = field(default_factory=dict)
    _state: dict[StateKey[Any], Any] = field(default_factory=dict)

    @property
    def retries(self) -> int:
        return max(0, self.attempts - 1)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0

    @overload
    def get(self, key: StateKey[T]) -> T | None: ...
    @overload
    def get(self, key: StateKey[T], default: D) -> T | D: ...

    def get(self, key: StateKey[T], default: Any = None) -> Any:
        return self._state.get(key, default)

    def __getitem__(self, key: StateKey[T]) -> T:
        value: T = self._state[key]
        return value

    def __setitem__(self, key: StateKey[T], value: T) -> None:
        self._state[key] = value

    def __contains__(self, key: StateKey[Any]) -> bool:
        return key in self._state

    def pop(self, key: StateKey[T]) -> T | None:
        value: T | None = self._state.pop(key, None)
        return value


CONTEXT_KEY = web.RequestKey("kvgate_context", RequestContext)
