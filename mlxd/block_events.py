"""The MLX prefix cache seen as 16-token blocks, for vLLM-format KV events.

The cache holds whole token sequences (entries); KV-event consumers think in
fixed blocks. `BlockTracker` cuts each entry into its full `block_size`-token
blocks, names block i by the chained hash `hash((hash_{i-1}, tuple(tokens_i)))`
(`hash_{-1} = 0`, CPython's tuple-of-ints hash, stable across processes), and
reference-counts blocks across entries: a block is announced `stored` when the
first entry holding it arrives and `removed` when the last one goes. Entries
sharing a prefix share its blocks, so an entry's new blocks are always one run
at its end (one BlockStored with the parent hash), and so are the ones it frees.
A block counts while its entry is hot or compressed (a cold hit is restored).

Not thread-safe: called by the prefix cache's owner (the MLX engine thread); the
sink must accept calls from that thread (`kvproto.kv_events_app.KVEventSink` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

BLOCK_SIZE = 16


class BlockEvents(Protocol):
    def stored(self, hashes: Sequence[int], parent: int | None, tokens: Sequence[int]) -> None: ...
    def removed(self, hashes: Sequence[int]) -> None: ...
    def cleared(self) -> None: ...


def block_hashes(tokens: Sequence[int], block_size: int = BLOCK_SIZE) -> list[int]:
    """Chained hashes of the full blocks of `tokens`."""
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(int(t) for t in tokens[start:start + block_size])))
        hashes.append(parent)
    return hashes


class BlockTracker:
    """Reference counts of blocks held by cache entries; announces changes to `sink` (if any)."""

    def __init__(self, sink: BlockEvents | None, block_size: int = BLOCK_SIZE) -> None:
        self.sink = sink
        self.block_size = block_size
        self._refs: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._refs)

    def add(self, tokens: Sequence[int]) -> list[int]:
        """Count an entry of `tokens`; returns its block hashes (keep them for `remove`)."""
        hashes = block_hashes(tokens, self.block_size) if self.sink is not None else []
        fresh = [i for i, h in enumerate(hashes) if self._refs.get(h, 0) == 0]
        for h in hashes:
            self._refs[h] = self._refs.get(h, 0) + 1
        if fresh and self.sink is not None:
            first = fresh[0]
            parent = hashes[first - 1] if first else None
            tokens_run = [int(t) for t in tokens[first * self.block_size:len(hashes) * self.block_size]]
            self.sink.stored(hashes[first:], parent, tokens_run)
        return hashes

    def remove(self, hashes: Sequence[int]) -> None:
        """Uncount an entry's blocks; announce those no entry holds any more."""
        gone = []
        for h in hashes:
            count = self._refs.get(h, 0) - 1
            if count <= 0:
                self._refs.pop(h, None)
                gone.append(h)
            else:
                self._refs[h] = count
        if gone and self.sink is not None:
            self.sink.removed(gone)

    def clear(self) -> None:
        """Every entry is gone: one AllBlocksCleared instead of a removal per block."""
        self._refs.clear()
        if self.sink is not None:
            self.sink.cleared()
