"""A recorder of the block events a cache reports (the `BlockEvents` callbacks), shared by
the MLX daemon's and sim-vllm's cache tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Events:
    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def stored(self, hashes: Sequence[int], parent: int | None, tokens: Sequence[int]) -> None:
        self.log.append(("stored", list(hashes), parent, list(tokens)))

    def removed(self, hashes: Sequence[int]) -> None:
        self.log.append(("removed", sorted(hashes)))

    def cleared(self) -> None:
        self.log.append(("cleared",))
