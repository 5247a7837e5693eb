"""Engine KV events -> the gateway's prefix index: one subscription per endpoint that
has `kv_events:` configured (vLLM's ZMQ publisher, or sim-vllm / mlx-serve's).

`BlockStored` / `BlockRemoved` / `AllBlocksCleared` of the engine's own cache
(medium "GPU" or unnamed) go into the index under the endpoint's id; a
subscriber reset (publisher restart, unrecoverable sequence gap, reconnection)
clears that endpoint before anything newer is applied. Blocks offloaded to other
media (CPU, disk) are left to the LMCache tier.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

from gateway.endpoint_config import KVEventsConfig
from gateway.endpoints import Endpoint
from gateway.prefix_index import PrefixIndex
from kvproto.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from kvproto.kv_events_sub import KVEventSubscriber

log = logging.getLogger("kvgate.kv_feed")
ENGINE_MEDIA = frozenset({None, "GPU", "gpu"})


def apply_batch(index: PrefixIndex, endpoint_id: str, batch: KVEventBatch) -> None:
    """Apply one batch's events, in order."""
    for event in batch.events:
        if isinstance(event, BlockStored):
            if event.medium in ENGINE_MEDIA:
                index.stored(endpoint_id, event.block_hashes, event.parent_block_hash, event.token_ids,
                             event.block_size)
        elif isinstance(event, BlockRemoved):
            if event.medium in ENGINE_MEDIA:
                index.removed(endpoint_id, event.block_hashes)
        elif isinstance(event, AllBlocksCleared):
            index.cleared(endpoint_id)


class KVEventFeed:
    """Owns the subscriptions; `start()` and `close()` from the app's cleanup context,
    `sync()` whenever the set of endpoints changes (reload, discovery, a drained endpoint)."""

    def __init__(self, endpoints: Sequence[Endpoint], index: PrefixIndex) -> None:
        self.index = index
        self.subscribers: dict[str, KVEventSubscriber] = {}
        self._configs: dict[str, KVEventsConfig] = {}
        self._started = self._closed = False
        for ep_id, cfg in _wanted(endpoints).items():
            self._add(ep_id, cfg)

    def _add(self, endpoint_id: str, cfg: KVEventsConfig) -> KVEventSubscriber:
        sub = self.subscribers[endpoint_id] = KVEventSubscriber(
            cfg.endpoint, cfg.replay_endpoint, topic=cfg.topic,
            on_batch=self._on_batch(endpoint_id), on_reset=self._on_reset(endpoint_id))
        self._configs[endpoint_id] = cfg
        return sub

    def _on_batch(self, endpoint_id: str) -> Callable[[KVEventBatch], None]:
        def on_batch(batch: KVEventBatch) -> None:
            apply_batch(self.index, endpoint_id, batch)

        return on_batch

    def _on_reset(self, endpoint_id: str) -> Callable[[], None]:
        def on_reset() -> None:
            log.info("kv events of %s: reset, its indexed blocks are dropped", endpoint_id)
            self.index.cleared(endpoint_id)

        return on_reset

    async def start(self) -> None:
        self._started = True
        for sub in self.subscribers.values():
            await sub.start()

    async def sync(self, endpoints: Sequence[Endpoint]) -> None:
        """Follow exactly the publishers of `endpoints`: a subscription for each new one (or
        one whose `kv_events:` changed); the others close and their indexed blocks go."""
        if self._closed:
            return
        wanted = _wanted(endpoints)
        for ep_id in [e for e, cfg in self._configs.items() if wanted.get(e) != cfg]:
            del self._configs[ep_id]
            await _close(self.subscribers.pop(ep_id))
            self.index.cleared(ep_id)
            log.info("kv events of %s: unsubscribed", ep_id)
        for ep_id, cfg in wanted.items():
            if ep_id not in self.subscribers:
                sub = self._add(ep_id, cfg)
                if self._started:
                    await sub.start()
                log.info("kv events of %s: subscribed to %s", ep_id, cfg.endpoint)

    async def close(self) -> None:
        self._closed = True
        for sub in self.subscribers.values():
            await _close(sub)

    def status(self) -> dict[str, dict[str, Any]]:
        return {ep: {"last_seq": sub.last_seq, **dataclasses.asdict(sub.stats), "blocks": self.index.stored_blocks(ep)}
                for ep, sub in self.subscribers.items()}


def _wanted(endpoints: Sequence[Endpoint]) -> dict[str, KVEventsConfig]:
    return {ep.id: ep.config.kv_events for ep in endpoints if ep.config.kv_events is not None}


async def _close(sub: KVEventSubscriber) -> None:
    try:
        await sub.close()
    except Exception:  # noqa: BLE001 - closing one must not stop the others
        log.exception("closing a KV-event subscription failed")
