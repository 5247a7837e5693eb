"""Block-level prefix cache with LRU eviction, modelled on vLLM's.

A prompt is cut into full blocks of `block_size` tokens; block i's hash chains
the previous block's hash with its tokens, so a block stands for the whole
prefix up to its end. A request's cache hit is the longest run of leading blocks
present. The cache is prefix-closed: evicting a block also drops its
descendants, which are unreachable without it.

Blocks touched by one request are refreshed tail-first, so ancestors are always
at least as recent as their descendants and LRU eviction takes tails first.
Blocks referenced by running requests or pinned are never evicted.

LMCache view: when `chunk_keys` is given, a block ending at a multiple of
`chunk_size` carries that chunk's LMCache key; the cache calls `on_admit` with
the keys of chunks that became fully cached and `on_evict` with the keys of
chunks that stopped being so.

KV-event view: `block_events` (e.g. `kvproto.kv_events_app.KVEventSink`) hears
`stored(hashes, parent, tokens)` when `insert` adds a run of blocks,
`removed(hashes)` when blocks are evicted or dropped, and `cleared()` when `clear`
empties the cache. Stored and removed name blocks by the same hashes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

KeysCallback = Callable[[list[int]], None]
ChunkKeysFn = Callable[[Sequence[int]], list[int]]


class BlockEvents(Protocol):
    def stored(self, hashes: Sequence[int], parent: int | None, tokens: Sequence[int]) -> None: ...
    def removed(self, hashes: Sequence[int]) -> None: ...
    def cleared(self) -> None: ...


@dataclass(slots=True)
class Block:
    hash: int
    parent: int | None
    end: int
    chunk_key: int | None = None
    refs: int = 0
    pinned: bool = False
    compressed: bool = False
    children: set[int] = field(default_factory=set)


@dataclass(slots=True)
class Lease:
    """Blocks one request holds (referenced, so not evictable) until `PrefixCache.release`."""

    hashes: list[int]
    hit_blocks: int
    decompressed_tokens: int = 0


class PrefixCache:
    def __init__(self, block_size: int = 16, capacity_blocks: int = 8192, *, chunk_size: int = 256,
                 chunk_keys: ChunkKeysFn | None = None, on_admit: KeysCallback | None = None,
                 on_evict: KeysCallback | None = None, block_events: BlockEvents | None = None) -> None:
        if block_size < 1 or chunk_size % block_size:
            raise ValueError(f"block_size must divide the LMCache chunk size {chunk_size}, got {block_size}")
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self.chunk_size = chunk_size
        self._chunk_keys = chunk_keys
        self._on_admit = on_admit
        self._on_evict = on_evict
        self._events = block_events
        self._blocks: OrderedDict[int, Block] = OrderedDict()  # LRU first
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def referenced_blocks(self) -> int:
        return sum(1 for b in self._blocks.values() if b.refs)

    def block_hashes(self, tokens: Sequence[int]) -> list[int]:
        """Chained hashes of `tokens`' full blocks."""
        hashes: list[int] = []
        parent = 0
        size = self.block_size
        for start in range(0, len(tokens) - size + 1, size):
            parent = hash((parent, tuple(tokens[start:start + size])))
            hashes.append(parent)
        return hashes

    def cached_prefix_blocks(self, hashes: Sequence[int]) -> int:
        """Number of leading blocks present (no LRU update)."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def acquire(self, hashes: Sequence[int], num_tokens: int) -> Lease:
        """Reference the cached leading blocks of a `num_tokens` prompt and count the hit.

        Like vLLM, at least one prompt token is always computed, so a fully cached
        block-aligned prompt gets its last block recomputed.
        """
        n = min(self.cached_prefix_blocks(hashes), (num_tokens - 1) // self.block_size)
        lease = Lease(list(hashes[:n]), n)
        for h in lease.hashes:
            block = self._blocks[h]
            block.refs += 1
            if block.compressed:
                block.compressed = False
                lease.decompressed_tokens += self.block_size
        self._refresh(lease.hashes)
        return lease

    def insert(self, lease: Lease, hashes: Sequence[int], tokens: Sequence[int]) -> list[int]:
        """When prefill starts: add the prompt's missing blocks to the lease (and cache) while room allows.

        Returns the hashes of the blocks it created (one consecutive run), for `discard`.
        """
        keys = self._chunk_keys(tokens) if self._chunk_keys is not None and len(tokens) >= self.chunk_size else []
        admitted: list[int] = []
        created: list[int] = []
        for i in range(len(lease.hashes), len(hashes)):
            block = self._blocks.get(hashes[i])
            if block is None:
                if not self._make_room():
                    break
                end = (i + 1) * self.block_size
                chunk_key = keys[end // self.chunk_size - 1] if keys and end % self.chunk_size == 0 else None
                parent = hashes[i - 1] if i else None
                block = Block(hashes[i], parent, end, chunk_key)
                self._blocks[block.hash] = block
                if parent is not None:
                    self._blocks[parent].children.add(block.hash)
                if chunk_key is not None:
                    admitted.append(chunk_key)
                created.append(block.hash)
            block.refs += 1
            lease.hashes.append(block.hash)
        self._refresh(lease.hashes)
        if created and self._events is not None:
            first = (self._blocks[created[0]].end // self.block_size) - 1
            parent = hashes[first - 1] if first else None
            end = (first + len(created)) * self.block_size
            self._events.stored(created, parent, tokens[first * self.block_size:end])
        if admitted and self._on_admit is not None:
            self._on_admit(admitted)
        return created

    def discard(self, hashes: Sequence[int]) -> int:
        """Drop blocks (and descendants) that no running request references, e.g. a cancelled prefill's."""
        idle = [h for h in hashes if h in self._blocks and not self._blocks[h].refs]
        return self._drop(idle)

    def release(self, lease: Lease) -> None:
        for h in lease.hashes:
            block = self._blocks.get(h)
            if block is not None and block.refs:
                block.refs -= 1
        lease.hashes = []

    def _refresh(self, hashes: Sequence[int]) -> None:
        for h in reversed(hashes):
            self._blocks.move_to_end(h)

    def _make_room(self) -> bool:
        """Evict LRU blocks until one more fits; False if everything left is referenced or pinned."""
        while len(self._blocks) >= self.capacity_blocks:
            victim = next((b for b in self._blocks.values() if not b.refs and not b.pinned), None)
            if victim is None:
                return False
            self._drop([victim.hash])
        return True

    def _drop(self, roots: Iterable[int], *, notify: bool = True) -> int:
        """Remove blocks and their descendants; report lost chunk keys (and, if `notify`, the blocks).

        Returns blocks removed.
        """
        evicted: list[int] = []
        stack = list(roots)
        removed: list[int] = []
        while stack:
            block = self._blocks.pop(stack.pop(), None)
            if block is None:
                continue
            removed.append(block.hash)
            stack.extend(block.children)
            if block.parent is not None and block.parent in self._blocks:
                self._blocks[block.parent].children.discard(block.hash)
            if block.chunk_key is not None:
                evicted.append(block.chunk_key)
        self.evictions += len(removed)
        if removed and notify and self._events is not None:
            self._events.removed(removed)
        if evicted and self._on_evict is not None:
            self._on_evict(evicted)
        return len(removed)

    def _walk(self, tokens: Sequence[int]) -> list[Block]:
        hashes = self.block_hashes(tokens)
        return [self._blocks[h] for h in hashes[:self.cached_prefix_blocks(hashes)]]

    def pin(self, tokens: Sequence[int]) -> int:
        """Pin the cached prefix of `tokens`; returns its length in tokens."""
        blocks = self._walk(tokens)
        for block in blocks:
            block.pinned = True
        return len(blocks) * self.block_size

    def set_compressed(self, tokens: Sequence[int] | None, compressed: bool) -> int:
        """Mark the cached prefix of `tokens` (all blocks when None); returns tokens affected."""
        blocks = list(self._blocks.values()) if tokens is None else self._walk(tokens)
        for block in blocks:
            block.compressed = compressed
        return len(blocks) * self.block_size

    def clear(self) -> int:
        """Drop every block not in use by a running request (pins included); returns tokens dropped."""
        idle = [b.hash for b in self._blocks.values() if not b.refs]
        removed = self._drop(idle, notify=False)
        if self._events is not None:  # an emptied cache is announced as such, like vLLM's prefix-cache reset
            if not self._blocks:
                self._events.cleared()
            elif removed:
                self._events.removed(idle)
        return removed * self.block_size

    def evict_prefix(self, tokens: Sequence[int]) -> int:
        """Drop the cached blocks of `tokens`' prefix that no running request uses; returns tokens dropped."""
        blocks = [b for b in self._walk(tokens) if not b.refs]
        return self._drop([blocks[0].hash]) * self.block_size if blocks else 0

    def stats(self) -> dict[str, int]:
        blocks = self._blocks.values()
        return {
            "blocks": len(self._blocks),
            "capacity_blocks": self.capacity_blocks,
            "referenced_blocks": sum(1 for b in blocks if b.refs),
            "pinned_blocks": sum(1 for b in blocks if b.pinned),
            "compressed_blocks": sum(1 for b in blocks if b.compressed),
            "chunks": sum(1 for b in blocks if b.chunk_key is not None),
            "evictions": self.evictions,
        }
