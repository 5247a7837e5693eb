"""The gateway's in-process prefix index, at the engines' block granularity.

Keys name whole prefixes: `key_i = hash((key_{i-1}, block_i))` over full blocks of
`block_size` tokens (16, vLLM's default), `key_{-1} = 0`, so a flat map of keys is
a trie and a lookup walks the request's keys in order, stopping per endpoint at
the first block it does not hold. Every replica holding a block is known.

Three kinds of entries, per endpoint:
- **stored**: from the engine's own KV events (`BlockStored` / `BlockRemoved` /
  `AllBlocksCleared`), authoritative until removed. Events name blocks by the
  engine's hash; the index maps those to its own keys through the events'
  `token_ids` and `parent_block_hash`, so it never has to reproduce vLLM's hash.
- **pending**: a prefix the gateway has just dispatched to the endpoint (it is
  being prefilled there now: a future hit), until that request settles.
- **learned**: a prefix an endpoint without an event feed served successfully,
  kept for `learned_ttl` seconds (what the gateway knows from its own traffic).

When a pending block is stored by its endpoint, the index notes the time: engines
publish `BlockStored` when they schedule the blocks' prefill, so the time of a
request's last full block is when its prefill started there (`prefill_started`),
whatever other routers queued ahead of it. (An engine that prefills in chunks
stores the last block with the last chunk: the time then covers that chunk only.)

Everything runs on the event loop: no locks. Bounded: at most `max_blocks`
(key, endpoint) entries of the learned kind; stored entries are bounded by the
engines' own capacities.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from kvkernel.blocks import BLOCK_SIZE, block_keys

__all__ = ["BLOCK_SIZE", "PrefixIndex", "block_keys"]


class _EndpointBlocks:
    """One endpoint's stored blocks: engine hash -> our key, and the key set."""

    __slots__ = ("by_engine_hash", "keys")

    def __init__(self) -> None:
        self.by_engine_hash: dict[object, int] = {}
        self.keys: dict[int, int] = {}  # our key -> how many engine blocks name it (usually 1)


class PrefixIndex:
    def __init__(self, block_size: int = BLOCK_SIZE, learned_ttl: float = 600.0, max_learned: int = 200_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.block_size = block_size
        self.learned_ttl = learned_ttl
        self.max_learned = max_learned
        self._clock = clock
        self._stored: dict[str, _EndpointBlocks] = {}
        self._holders: dict[int, set[str]] = {}  # key -> endpoints holding it (stored kind)
        self._pending: dict[int, dict[str, int]] = {}  # key -> endpoint -> in-flight count
        self._learned: OrderedDict[tuple[int, str], float] = OrderedDict()  # (key, endpoint) -> expiry
        self._started: dict[tuple[int, str], float] = {}  # pending (key, endpoint) -> when the engine stored it

    # ---- engine events -------------------------------------------------------------------
    def stored(self, endpoint: str, engine_hashes: Sequence[object], parent_hash: object | None,
               token_ids: Sequence[int], block_size: int) -> int:
        """A `BlockStored` event; returns how many blocks were indexed. Blocks whose
        parent is unknown (an event missed) are skipped: a key names a whole prefix."""
        if block_size != self.block_size or len(token_ids) < len(engine_hashes) * block_size:
            return 0
        blocks = self._stored.setdefault(endpoint, _EndpointBlocks())
        parent = 0 if parent_hash is None else blocks.by_engine_hash.get(parent_hash)
        if parent is None:
            return 0
        keys = block_keys(token_ids[:len(engine_hashes) * block_size], block_size, parent)
        now = self._clock()
        for engine_hash, key in zip(engine_hashes, keys, strict=True):
            parent = key
            if engine_hash in blocks.by_engine_hash:
                continue
            blocks.by_engine_hash[engine_hash] = parent
            blocks.keys[parent] = blocks.keys.get(parent, 0) + 1
            self._holders.setdefault(parent, set()).add(endpoint)
            if endpoint in self._pending.get(parent, ()):
                self._started.setdefault((parent, endpoint), now)
        return len(engine_hashes)

    def removed(self, endpoint: str, engine_hashes: Iterable[object]) -> None:
        blocks = self._stored.get(endpoint)
        if blocks is None:
            return
        for engine_hash in engine_hashes:
            key = blocks.by_engine_hash.pop(engine_hash, None)
            if key is None:
                continue
            left = blocks.keys.get(key, 1) - 1
            if left > 0:
                blocks.keys[key] = left
                continue
            blocks.keys.pop(key, None)
            holders = self._holders.get(key)
            if holders is not None:
                holders.discard(endpoint)
                if not holders:
                    del self._holders[key]

    def cleared(self, endpoint: str) -> None:
        """`AllBlocksCleared`, a publisher restart or an unrecoverable gap: forget the
        endpoint's stored blocks (its learned entries go too: they predate the reset)."""
        blocks = self._stored.pop(endpoint, None)
        if blocks is not None:
            for key in blocks.keys:
                holders = self._holders.get(key)
                if holders is not None:
                    holders.discard(endpoint)
                    if not holders:
                        del self._holders[key]
        for entry in [e for e in self._learned if e[1] == endpoint]:
            del self._learned[entry]

    def stored_blocks(self, endpoint: str) -> int:
        blocks = self._stored.get(endpoint)
        return len(blocks.keys) if blocks is not None else 0

    # ---- the gateway's own traffic -------------------------------------------------------
    def expect(self, endpoint: str, keys: Sequence[int]) -> None:
        """A request with these keys was dispatched to `endpoint`: a future hit there."""
        pending = self._pending
        for key in keys:
            per = pending.get(key)
            if per is None:
                pending[key] = {endpoint: 1}
            else:
                per[endpoint] = per.get(endpoint, 0) + 1

    def settle(self, endpoint: str, keys: Sequence[int], served: bool, learn: bool) -> None:
        """The request left `endpoint`. `served`: its prefill completed there; with `learn`
        (an endpoint without an event feed), its prefix is remembered for `learned_ttl`."""
        pending = self._pending
        for key in keys:
            per = pending.get(key)
            if per is None:
                continue
            left = per.get(endpoint, 0) - 1
            if left > 0:
                per[endpoint] = left
            else:
                per.pop(endpoint, None)
                self._started.pop((key, endpoint), None)
                if not per:
                    del pending[key]
        if served and learn and keys:
            expiry = self._clock() + self.learned_ttl
            learned = self._learned
            for key in keys:
                entry = (key, endpoint)
                learned[entry] = expiry
                learned.move_to_end(entry)
            while len(learned) > self.max_learned:
                learned.popitem(last=False)

    def prefill_started(self, endpoint: str, keys: Sequence[int]) -> float | None:
        """When `endpoint` stored the request's last full block since it was expected (the
        engine scheduled this request's prefill; earlier blocks may have been another
        request's, sharing the prefix), None if not (fully cached, or no events yet)."""
        return self._started.get((keys[-1], endpoint)) if keys else None

    # ---- lookups -------------------------------------------------------------------------
    def match(self, keys: Sequence[int], endpoints: Iterable[str]) -> dict[str, int]:
        """Matched prefix tokens per endpoint (endpoints with no match are absent)."""
        alive = set(endpoints)
        matched: dict[str, int] = {}
        now = self._clock()
        stored, pending, learned = self._holders, self._pending, self._learned
        depth = 0
        for key in keys:  # an endpoint's match ends at the first block it does not hold
            holders, waiting = stored.get(key), pending.get(key)
            for ep in list(alive):
                if not ((holders is not None and ep in holders) or (waiting is not None and ep in waiting)
                        or learned.get((key, ep), 0.0) > now):
                    alive.discard(ep)
                    if depth:
                        matched[ep] = depth * self.block_size
            if not alive:
                return matched
            depth += 1
        for ep in alive:
            if depth:
                matched[ep] = depth * self.block_size
        return matched

    def forget_endpoint(self, endpoint: str) -> None:
        """The endpoint left the fleet (or lost its cache): drop all it was said to hold."""
        self.cleared(endpoint)
        for key in list(self._pending):
            per = self._pending[key]
            per.pop(endpoint, None)
            self._started.pop((key, endpoint), None)
            if not per:
                del self._pending[key]

    def stats(self) -> dict[str, int]:
        return {"stored_keys": len(self._holders), "pending_keys": len(self._pending),
                "learned_entries": len(self._learned), "started_entries": len(self._started)}
