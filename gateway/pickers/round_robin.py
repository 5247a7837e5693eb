"""`round_robin`: each candidate in turn."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.endpoints import Endpoint
from gateway.pickers.base import Choice, Picker
from gateway.pickers.registry import register_picker
from kvkernel.context import RequestContext


@register_picker("round_robin")
class RoundRobin(Picker):
    def __init__(self, config: None = None) -> None:
        super().__init__(config)
        self._next = 0

    def pick(self, candidates: Sequence[Endpoint], ctx: RequestContext) -> Choice:
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return Choice(chosen)
