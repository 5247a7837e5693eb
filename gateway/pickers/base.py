"""The picker contract.

A picker sees only eligible, not-yet-tried endpoints (never an empty list) and
returns a `Choice`: the endpoint, the kind of decision and a short reason. The
exchange turns it into the request's typed `RoutingDecision`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from gateway.endpoints import Endpoint
from kvkernel.context import DecisionKind, RequestContext, StateKey

# When the chosen engine started this attempt's prefill (monotonic s), from its KV events;
# set before `first_byte` when known.
PREFILL_STARTED: StateKey[float] = StateKey("prefill_started", float)


@dataclass(frozen=True, slots=True)
class Choice:
    endpoint: Endpoint
    kind: DecisionKind = DecisionKind.POLICY
    reason: str = ""


class Picker:
    """Base class. `@register_picker` sets `type_name`; `Config` (a frozen dataclass, or
    None) is decoded strictly from the cluster's `picker.config`."""

    type_name: ClassVar[str] = ""
    Config: ClassVar[type[Any] | None] = None
    # Typed request state the picker needs from the filter chain (checked at config time).
    consumes: ClassVar[tuple[StateKey[Any], ...]] = ()
    # True: the picker weighs cache hints itself, so the pre-pick step does not force
    # the chain's preferred endpoint on it.
    weighs_hints: ClassVar[bool] = False

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def pick(self, candidates: Sequence[Endpoint], ctx: RequestContext) -> Choice:
        raise NotImplementedError

    # Attempt lifecycle (the proxy's view): the request was sent to `endpoint`, its first
    # body byte arrived, the attempt is over (after relay or failure). Default: nothing.
    def dispatched(self, ctx: RequestContext, endpoint: Endpoint) -> None:
        return None

    def first_byte(self, ctx: RequestContext, endpoint: Endpoint) -> None:
        return None

    def released(self, ctx: RequestContext, endpoint: Endpoint) -> None:
        return None

    def forget(self, endpoint_id: str) -> None:
        """The endpoint left the fleet (and drained): drop what was learned about it."""
        return None

    def status(self) -> dict[str, Any] | None:
        """What `/kvgate/status` shows of this picker's learned state (None: nothing)."""
        return None

    def gauges(self) -> list[tuple[str, str, float]]:
        """(endpoint id, name, value) of learned per-endpoint figures, for `/metrics`."""
        return []
