"""A bounded, TTL'd local prefix index: which endpoint recently served which chunks.

The `kvcache` filter falls back to it when the LMCache controller is slow, down or
has nothing useful. It learns from the gateway's own routing: when an endpoint
answered a request, the engine holds that prompt's full 256-token chunks.

Keys are LMCache chunk keys (`kvproto.chunks.chunk_keys`): each key hashes the
previous key with its chunk, so a key names a whole prefix and a flat map of keys
is a trie over chunks (node = key, path from the root = the prefix). A lookup
walks the request's keys in order; an endpoint's match ends at the first chunk it
does not hold (or holds only past its TTL).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvkernel.decode import FieldError, Seconds
from kvproto.chunks import CHUNK_SIZE, chunk_keys


@dataclass(frozen=True, slots=True)
class LocalIndexConfig:
    """`local_index:` of the kvcache filter."""

    enabled: bool = True
    max_chunks: int = 100_000
    ttl: Seconds = 600.0

    def __post_init__(self) -> None:
        if self.max_chunks < 1:
            raise FieldError("max_chunks", f"must be >= 1, got {self.max_chunks}")
        if self.ttl <= 0:
            raise FieldError("ttl", "must be > 0")


def prompt_chunk_keys(tokens: Sequence[int], chunk_size: int = CHUNK_SIZE) -> list[int]:
    """LMCache chunk keys of every full chunk of `tokens`."""
    return chunk_keys(tokens, chunk_size)


class LocalPrefixIndex:
    """chunk key -> {endpoint id: expiry}; least recently touched keys go first when full."""

    def __init__(self, max_chunks: int = 100_000, ttl: float = 600.0, *,
                 chunk_size: int = CHUNK_SIZE, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_chunks = max_chunks
        self.ttl = ttl
        self.chunk_size = chunk_size
        self._clock = clock
        self._nodes: OrderedDict[int, dict[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._nodes)

    def learn(self, endpoint_id: str, keys: Sequence[int]) -> list[int]:
        """Record that `endpoint_id` now holds the prefix whose chunk keys are `keys`.
        Returns the keys it did not hold (or held only past their TTL) before."""
        now = self._clock()
        expires = now + self.ttl
        new = []
        for key in keys:
            holders = self._nodes.get(key)
            if holders is None:
                holders = self._nodes[key] = {}
            else:
                self._nodes.move_to_end(key)
            if holders.get(endpoint_id, now) <= now:
                new.append(key)
            holders[endpoint_id] = expires
        while len(self._nodes) > self.max_chunks:
            self._nodes.popitem(last=False)
        return new

    def match(self, keys: Sequence[int], endpoints: Sequence[str] | None = None) -> dict[str, int]:
        """Matched prefix tokens per endpoint (only endpoints with at least one chunk).

        `endpoints` restricts the answer to those ids (e.g. one cluster's).
        """
        now = self._clock()
        wanted = set(endpoints) if endpoints is not None else None
        alive: set[str] | None = None
        matched: dict[str, int] = {}
        for i, key in enumerate(keys):
            holders = self._nodes.get(key)
            if not holders:
                break
            here = {ep for ep, exp in holders.items() if exp > now and (wanted is None or ep in wanted)}
            alive = here if alive is None else alive & here
            if not alive:
                break
            for ep in alive:
                matched[ep] = (i + 1) * self.chunk_size
        return matched

    def forget(self, endpoint_id: str, keys: Sequence[int] | None = None) -> int:
        """Drop `endpoint_id` from `keys` (all keys if None); returns entries removed."""
        removed = 0
        for key in list(self._nodes) if keys is None else keys:
            holders = self._nodes.get(key)
            if holders is not None and holders.pop(endpoint_id, None) is not None:
                removed += 1
                if not holders:
                    del self._nodes[key]
        return removed

    def purge_expired(self) -> int:
        """Remove expired holders and empty keys; returns keys removed."""
        now = self._clock()
        dead = []
        for key, holders in self._nodes.items():
            for ep in [ep for ep, exp in holders.items() if exp <= now]:
                del holders[ep]
            if not holders:
                dead.append(key)
        for key in dead:
            del self._nodes[key]
        return len(dead)
