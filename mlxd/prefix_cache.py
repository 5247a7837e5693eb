"""Prefix KV cache: longest-token-prefix reuse, LRU in tokens, pins, a zstd cold tier.

An entry is a token sequence plus the KV arrays of exactly those tokens. A lookup
finds the entry sharing the longest token prefix with the request and returns the
KV of that shared prefix (a prefix of any cached sequence is reusable, because a
token's keys and values depend only on the tokens before it).

Tiers: hot entries hold live arrays and count against `capacity_tokens`; when the
hot tier is over capacity the least recently used unpinned entries are compressed
into the cold tier (bounded by `cold_capacity_tokens`, LRU-dropped beyond it), or
dropped when the cold tier is disabled. A hit on a cold entry restores it to hot.
Pinned entries are never evicted or dropped by capacity (only `clear` removes them).

Chunk accounting: every full `CHUNK_SIZE`-token chunk of every entry (hot or cold)
is reference-counted by its LMCache chunk key; `on_admit` is called with the keys
that become held and `on_evict` with the keys no entry holds any more.

Block events: with `block_events`, the cache also reports its entries as
16-token blocks (see `mlxd.block_events`): blocks stored when an entry arrives,
removed when the last entry holding them is dropped, all cleared by `clear`.

Not thread-safe: one owner (the MLX engine thread) calls every method. The KV
representation is opaque here; a `KVCodec` slices, packs and unpacks it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from kvproto.chunks import chunk_keys
from mlxd.block_events import BlockEvents, BlockTracker

KV = Any  # one sequence's per-layer (keys, values) arrays, opaque to this module


class KVCodec(Protocol):
    def length(self, kv: KV) -> int: ...
    def slice(self, kv: KV, n: int) -> KV: ...
    def pack(self, kv: KV) -> bytes: ...
    def unpack(self, blob: bytes) -> KV: ...


@dataclass(eq=False)
class Entry:
    tokens: np.ndarray
    keys: list[int]
    kv: KV | None = None  # hot
    blob: bytes | None = None  # cold (compressed)
    pinned: bool = False
    blocks: list[int] = field(default_factory=list)  # block hashes, for BlockTracker.remove

    @property
    def size(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True, slots=True)
class Match:
    """`n` leading tokens of the query are cached; `kv` holds exactly those (None if n == 0)."""

    n: int
    kv: KV | None
    restored: bool = False


@dataclass
class CacheStats:
    hot_tokens: int = 0
    cold_tokens: int = 0
    cold_bytes: int = 0
    compressions: int = 0
    restores: int = 0
    dropped_entries: int = 0


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two int arrays."""
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if len(diff) else m


class PrefixCache:
    """See the module docstring. `capacity_tokens` bounds the hot tier."""

    def __init__(self, codec: KVCodec, capacity_tokens: int, cold_capacity_tokens: int = 0,
                 on_admit: Callable[[list[int]], None] | None = None,
                 on_evict: Callable[[list[int]], None] | None = None,
                 block_events: BlockEvents | None = None) -> None:
        if capacity_tokens < 0 or cold_capacity_tokens < 0:
            raise ValueError("cache capacities must be >= 0")
        self.codec = codec
        self.capacity_tokens = capacity_tokens
        self.cold_capacity_tokens = cold_capacity_tokens
        self.on_admit = on_admit or (lambda keys: None)
        self.on_evict = on_evict or (lambda keys: None)
        self.stats = CacheStats()
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # LRU first
        self._ids = itertools.count()
        self._refs: dict[int, int] = {}
        self._blocks = BlockTracker(block_events)

    # ---- queries -------------------------------------------------------------------

    def held_keys(self) -> set[int]:
        """Chunk keys currently held (hot or cold)."""
        return set(self._refs)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def _best(self, tokens: np.ndarray) -> tuple[int | None, int]:
        best_id, best_n = None, 0
        for eid, entry in self._entries.items():
            n = common_prefix(entry.tokens, tokens)
            if n > best_n or (n == best_n and n > 0 and entry.kv is not None):
                best_id, best_n = eid, n
        return best_id, best_n

    def lookup(self, tokens: Sequence[int], limit: int | None = None) -> Match:
        """Longest cached prefix of `tokens`, at most `limit` tokens; restores a cold hit."""
        query = np.asarray(tokens, dtype=np.int64)
        eid, n = self._best(query)
        n = min(n, len(query) if limit is None else limit)
        if eid is None or n <= 0:
            return Match(0, None)
        entry = self._entries[eid]
        restored = entry.kv is None
        if restored:
            self._restore(entry)
        self._entries.move_to_end(eid)
        kv = self.codec.slice(entry.kv, n)
        self._enforce()
        return Match(n, kv, restored)

    # ---- mutations -------------------------------------------------------------------

    def insert(self, tokens: Sequence[int], kv: KV) -> int:
        """Cache `kv` for `tokens` (trimmed to the shorter of the two). Returns tokens cached."""
        n = min(len(tokens), self.codec.length(kv))
        if n <= 0:
            return 0
        seq = np.asarray(tokens[:n], dtype=np.int64)
        for eid, entry in self._entries.items():
            if entry.size >= n and common_prefix(entry.tokens, seq) == n:
                self._entries.move_to_end(eid)  # already covered by a longer entry
                return 0
        new_id = self._add(Entry(seq, chunk_keys(seq.tolist()), kv=self.codec.slice(kv, n)))
        for eid in [e for e, x in self._entries.items() if e != new_id and not x.pinned
                    and common_prefix(x.tokens, seq) == x.size]:
            self._drop(eid)  # subsumed by the new, longer entry
        self._enforce()
        return n

    def pin(self, tokens: Sequence[int]) -> int:
        """Pin the cached prefix of `tokens`; returns its length (0 if nothing is cached)."""
        query = np.asarray(tokens, dtype=np.int64)
        eid, n = self._best(query)
        if eid is None or n == 0:
            return 0
        entry = self._entries[eid]
        if entry.size == n:
            entry.pinned = True
            return n
        kv = entry.kv if entry.kv is not None else self.codec.unpack(entry.blob or b"")
        self._add(Entry(query[:n].copy(), chunk_keys(query[:n].tolist()),
                        kv=self.codec.slice(kv, n), pinned=True))
        self._enforce()
        return n

    def clear(self) -> int:
        """Drop every entry, pinned ones included; returns the tokens dropped."""
        total = sum(e.size for e in self._entries.values())
        for eid in list(self._entries):
            self._drop(eid, announce_blocks=False)
        self._blocks.clear()
        return total

    def compress(self, tokens: Sequence[int] | None = None) -> int:
        """Move hot entries to the cold tier: all, or those sharing `tokens`' cached prefix.
        Returns the number of tokens compressed (for `tokens`: the cached prefix length)."""
        return self._retier(tokens, to_cold=True)

    def decompress(self, tokens: Sequence[int] | None = None) -> int:
        """Restore cold entries (all, or those sharing `tokens`' cached prefix) to hot."""
        return self._retier(tokens, to_cold=False)

    # ---- internals -------------------------------------------------------------------

    def _retier(self, tokens: Sequence[int] | None, to_cold: bool) -> int:
        if tokens is None:
            targets, result = list(self._entries.values()), None
        else:
            query = np.asarray(tokens, dtype=np.int64)
            _, n = self._best(query)
            if n == 0:
                return 0
            targets = [e for e in self._entries.values() if common_prefix(e.tokens, query) == n]
            result = n
        moved = 0
        for entry in targets:
            if to_cold and entry.kv is not None:
                self._compress(entry)
                moved += entry.size
            elif not to_cold and entry.kv is None:
                self._restore(entry)
                moved += entry.size
        self._enforce()
        return moved if result is None else result

    def _add(self, entry: Entry) -> int:
        eid = next(self._ids)
        self._entries[eid] = entry
        entry.blocks = self._blocks.add(entry.tokens.tolist())
        self.stats.hot_tokens += entry.size
        fresh = []
        for key in entry.keys:
            count = self._refs.get(key, 0)
            if count == 0:
                fresh.append(key)
            self._refs[key] = count + 1
        if fresh:
            self.on_admit(fresh)
        return eid

    def _drop(self, eid: int, announce_blocks: bool = True) -> None:
        entry = self._entries.pop(eid)
        if announce_blocks:
            self._blocks.remove(entry.blocks)
        if entry.kv is not None:
            self.stats.hot_tokens -= entry.size
        else:
            self.stats.cold_tokens -= entry.size
            self.stats.cold_bytes -= len(entry.blob or b"")
        self.stats.dropped_entries += 1
        gone = []
        for key in entry.keys:
            count = self._refs[key] - 1
            if count == 0:
                del self._refs[key]
                gone.append(key)
            else:
                self._refs[key] = count
        if gone:
            self.on_evict(gone)

    def _compress(self, entry: Entry) -> None:
        entry.blob, entry.kv = self.codec.pack(entry.kv), None
        self.stats.hot_tokens -= entry.size
        self.stats.cold_tokens += entry.size
        self.stats.cold_bytes += len(entry.blob)
        self.stats.compressions += 1

    def _restore(self, entry: Entry) -> None:
        blob = entry.blob or b""
        entry.kv, entry.blob = self.codec.unpack(blob), None
        self.stats.cold_tokens -= entry.size
        self.stats.cold_bytes -= len(blob)
        self.stats.hot_tokens += entry.size
        self.stats.restores += 1

    def _enforce(self) -> None:
        """Bring both tiers within capacity, least recently used first; pinned entries stay."""
        for eid in list(self._entries):
            if self.stats.hot_tokens <= self.capacity_tokens:
                break
            entry = self._entries[eid]
            if entry.pinned or entry.kv is None:
                continue
            if self.cold_capacity_tokens > 0:
                self._compress(entry)
            else:
                self._drop(eid)
        for eid in list(self._entries):
            if self.stats.cold_tokens <= self.cold_capacity_tokens:
                break
            entry = self._entries[eid]
            if entry.kv is None and not entry.pinned:
                self._drop(eid)
