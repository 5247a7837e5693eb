"""The learning part of the `kvcache` filter: the local prefix index taught by the
gateway's own traffic.

A response head with a 2xx status means the chosen endpoint is computing this
prompt's prefix now, so the index learns it at once (the next request sharing it
should go there, before any controller hears of it). If no first byte followed,
only what that head taught is withdrawn. An endpoint that became ineligible has
likely lost its cache: its entries are dropped once per outage.

Per-request state lives under this module's private typed keys.
"""

from __future__ import annotations

from collections.abc import Sequence

from filters.base import EndpointView, ResponseHead
from filters.keys import token_ids
from filters.local_index import LocalIndexConfig, LocalPrefixIndex, prompt_chunk_keys
from kvkernel.context import RequestContext, StateKey
from kvproto.chunks import CHUNK_SIZE

# The prompt's chunk keys, computed once per request.
_CHUNK_KEYS: StateKey[list[int]] = StateKey("kvcache.chunk_keys", list)
# (index node, keys the response head taught that the node did not hold before).
_TENTATIVE: StateKey[tuple[str, list[int]]] = StateKey("kvcache.tentative", tuple)


def node_name(cluster: str, endpoint_id: str) -> str:
    """The index's name for an endpoint: endpoint ids are unique only within a cluster."""
    return f"{cluster}\x1f{endpoint_id}"


def request_keys(ctx: RequestContext) -> list[int] | None:
    """The prompt's chunk keys (computed once per request), or None without a full chunk."""
    keys = ctx.get(_CHUNK_KEYS)
    if keys is None:
        tokens = token_ids(ctx)
        if tokens is None or len(tokens) < CHUNK_SIZE:
            return None
        keys = ctx[_CHUNK_KEYS] = prompt_chunk_keys(tokens)
    return keys


class PrefixLearner:
    def __init__(self, config: LocalIndexConfig) -> None:
        self.enabled = config.enabled
        self.index = LocalPrefixIndex(config.max_chunks, config.ttl)
        self._ejected: set[str] = set()  # nodes of endpoints seen ineligible (entries dropped)

    def match(self, cluster: str, endpoints: Sequence[EndpointView], keys: Sequence[int]) -> dict[str, int]:
        """Matched prefix tokens per endpoint id, for the eligible-or-not `endpoints`."""
        if not self.enabled or not keys:
            return {}
        names = {node_name(cluster, ep.id): ep.id for ep in endpoints}
        return {names[node]: n for node, n in self.index.match(keys, list(names)).items()}

    def forget_ejected(self, cluster: str, endpoints: Sequence[EndpointView]) -> None:
        for ep in endpoints:
            node = node_name(cluster, ep.id)
            if ep.eligible():
                self._ejected.discard(node)
            elif node not in self._ejected:
                self._ejected.add(node)
                self.index.forget(node)

    def on_head(self, ctx: RequestContext, head: ResponseHead) -> None:
        """Learn tentatively from an accepted upstream response head."""
        if not self.enabled or head.local or ctx.endpoint is None or not 200 <= head.status < 300:
            return
        keys = request_keys(ctx)
        if keys is not None:
            node = node_name(ctx.cluster or "", ctx.endpoint)
            ctx[_TENTATIVE] = (node, self.index.learn(node, keys))

    def on_complete(self, ctx: RequestContext) -> list[int] | None:
        """Confirm or withdraw what the head taught; the chunk keys of a request whose
        prefill completed on `ctx.endpoint` (it now holds them), else None."""
        keys = request_keys(ctx)
        if ctx.endpoint is None or keys is None:
            return None
        if ctx.status is None or not 200 <= ctx.status < 300 or ctx.ttfb_ms is None:
            # No first byte: the prefill did not finish there. Only what the head taught is
            # withdrawn: chunks the endpoint held before (a shared system prompt) stay.
            node, learned = ctx.get(_TENTATIVE) or ("", [])
            self.index.forget(node, learned)
            return None
        if self.enabled:
            self.index.learn(node_name(ctx.cluster or "", ctx.endpoint), keys)
        return keys

    def teach(self, cluster: str, endpoint_id: str, keys: Sequence[int]) -> None:
        """Another source (a background controller lookup) says the endpoint holds `keys`."""
        if self.enabled and keys:
            self.index.learn(node_name(cluster, endpoint_id), keys)

    def forget(self, cluster: str, endpoint_id: str, keys: Sequence[int]) -> None:
        self.index.forget(node_name(cluster, endpoint_id), keys)
