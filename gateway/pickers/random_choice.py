"""`random`: a uniformly random candidate."""

from __future__ import annotations

import random
from collections.abc import Sequence

from gateway.endpoints import Endpoint
from gateway.pickers.base import Choice, Picker
from gateway.pickers.registry import register_picker
from kvkernel.context import RequestContext


@register_picker("random")
class RandomChoice(Picker):
    def __init__(self, config: None = None, rng: random.Random | None = None) -> None:
        super().__init__(config)
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Endpoint], ctx: RequestContext) -> Choice:
        return Choice(self._rng.choice(list(candidates)))
