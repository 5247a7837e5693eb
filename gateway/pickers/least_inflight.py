"""`least_inflight`: fewest in-flight requests; ties rotate so equal endpoints share the load."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.endpoints import Endpoint
from gateway.pickers.base import Choice, Picker
from gateway.pickers.registry import register_picker
from kvkernel.context import RequestContext


@register_picker("least_inflight")
class LeastInflight(Picker):
    def __init__(self, config: None = None) -> None:
        super().__init__(config)
        self._turn = 0

    def pick(self, candidates: Sequence[Endpoint], ctx: RequestContext) -> Choice:
        low = min(e.inflight for e in candidates)
        tied = [e for e in candidates if e.inflight == low]
        self._turn += 1
        return Choice(tied[self._turn % len(tied)])
