"""`kvcache` filter: where does this prompt's KV cache live? Writes `CACHE_HINTS`.

Reads `TOKENS` (the `tokenizer` filter) and `ctx.cluster`. Three sources, merged
per endpoint (the longest match wins, replicas all kept):

- tier "prefix-index": the gateway's in-process block index (16-token blocks; fed
  by the engines' KV events, by prefixes in flight, and by what endpoints without
  an event feed served). In-process: no round trip.
- tier "lmcache": the controller's `/lookup` (256-token chunks), asked per
  `controller_lookup`: on the request path within `lookup_timeout`, only on an
  index miss, or off the path (a background lookup that teaches the local index
  for later requests; the default when the cluster's engines publish events).
- tier "local-index": 256-token chunks learned from this gateway's own traffic
  and from background controller answers (TTL'd).

`preferred_endpoint` is always an eligible endpoint (or None). If the controller
is slow, down or behind an open breaker, the other tiers answer; the reason says
why (e.g. "lmcache_timeout"). It never fails a request.

On completion it teaches the local index which endpoint now holds the prompt's
chunks, feeds the cache-management tracker and, at most once per
`cache_strategy.interval`, schedules a decision round on the background queue
(decided in a worker thread; its pin/compress/evict actions go on that queue too).

Three parts, one module each: lookup (`filters.cache_lookup`), learning
(`filters.cache_learning`), cache management (`filters.cache_management`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import aiohttp

from filters.base import CONTINUE, EndpointView, Filter, FilterResult, ResponseHead, Services
from filters.cache_learning import PrefixLearner, request_keys
from filters.cache_lookup import ControllerLookup
from filters.cache_management import CacheManagement
from filters.cache_manager import CacheManager
from filters.cache_strategy import CacheStrategyConfig
from filters.instance_map import InstanceMap, MapMode
from filters.keys import CACHE_HINTS, TOKENS, CacheHints, Tier, prompt_block_keys
from filters.kvcache_metrics import KVCacheMetrics
from filters.lmcache_client import LMCacheClient
from filters.local_index import LocalIndexConfig, LocalPrefixIndex, prompt_chunk_keys
from filters.registry import register
from kvkernel.breaker import BreakerState
from kvkernel.context import RequestContext
from kvkernel.decode import FieldError, Seconds
from kvkernel.resilience import BreakerSettings, RetrySettings
from kvproto.chunks import CHUNK_SIZE

log = logging.getLogger("kvgate.kvcache")


@dataclass(frozen=True, slots=True)
class KVCacheConfig:
    lmcache_endpoint: str | None = None  # None: local index only
    lookup_timeout: Seconds = 0.05
    # When the controller is asked, relative to the request: "on_request" (within
    # lookup_timeout, every prompt with a full chunk), "on_miss" (only when the in-process
    # prefix index has no match), "off_path" (never on the request path: a miss starts a
    # background lookup whose answer serves later requests), "auto" ("off_path" for
    # clusters whose endpoints publish KV events, else "on_request").
    controller_lookup: Literal["auto", "on_request", "on_miss", "off_path"] = "auto"
    lookup_retry: bool = False           # retry /lookup inside lookup_timeout
    request_timeout: Seconds = 2.0
    retry: RetrySettings = field(default_factory=RetrySettings)
    circuit_breaker: BreakerSettings = field(default_factory=BreakerSettings)
    evict_fallback: Literal["clear", "skip"] = "clear"
    instance_map: MapMode = "explicit"
    instance_map_refresh: Seconds = 60.0
    local_index: LocalIndexConfig = field(default_factory=LocalIndexConfig)
    cache_strategy: CacheStrategyConfig = field(default_factory=CacheStrategyConfig)

    def __post_init__(self) -> None:
        if self.lmcache_endpoint is not None and not _http_url(self.lmcache_endpoint):
            raise FieldError("lmcache_endpoint", f"must be an http(s) URL with a host, got {self.lmcache_endpoint!r}")
        if self.instance_map_refresh <= 0:  # 0 would ask /query_instance on every request
            raise FieldError("instance_map_refresh", "must be > 0")
        if self.lookup_timeout <= 0:
            raise FieldError("lookup_timeout", "must be > 0")
        if self.request_timeout <= 0:
            raise FieldError("request_timeout", "must be > 0")
        if self.lmcache_endpoint is None and (self.cache_strategy.enabled or self.instance_map == "query_instance"):
            raise FieldError("lmcache_endpoint", "is required by cache_strategy and instance_map: query_instance")


def _http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad or out-of-range port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


@register("kvcache")
class KVCacheFilter(Filter):
    Config = KVCacheConfig
    consumes = (TOKENS,)
    produces = (CACHE_HINTS,)
    config: KVCacheConfig

    def __init__(self, config: KVCacheConfig, name: str, services: Services) -> None:
        super().__init__(config, name, services)
        self.metrics = KVCacheMetrics(services.metrics)
        self.learner = PrefixLearner(config.local_index)
        self.instances = InstanceMap("identity" if config.instance_map == "identity" else "explicit")
        self.lookup: ControllerLookup | None = None
        self.actions_client: LMCacheClient | None = None  # background pin/compress/evict
        self.management: CacheManagement | None = None

    @property
    def index(self) -> LocalPrefixIndex:
        return self.learner.index

    @property
    def client(self) -> LMCacheClient | None:
        return self.lookup.client if self.lookup is not None else None

    async def start(self) -> None:
        cfg = self.config
        if cfg.lmcache_endpoint is None:
            return
        client = self._client("lmcache", self.services.session)  # the request path: the cheap client
        # Background actions get their own breaker: a controller that rejects an action
        # (real LMCache answers 500 when its workers reject, e.g., a compress method) must not take
        # lookups, and so routing, down with it.
        actions_client = self.actions_client = self._client("lmcache-actions")
        if cfg.instance_map == "query_instance":
            everyone = [ep for c in self.services.clusters.cluster_names()
                        for ep in self.services.clusters.endpoints(c)]
            self.instances = InstanceMap("query_instance", query=client.query_instance,
                                         all_endpoints=everyone, refresh=cfg.instance_map_refresh)
        self.lookup = ControllerLookup(client, self.instances, self.metrics, timeout=cfg.lookup_timeout,
                                       retry=cfg.lookup_retry)
        if cfg.instance_map == "query_instance":
            self.lookup.refresh_instances(everyone, self.services.background)
        if cfg.cache_strategy.enabled:
            self.management = CacheManagement(cfg.cache_strategy, actions_client, self.instances,
                                              self.services, self.metrics, self.learner.forget)

    def _client(self, name: str, session: aiohttp.ClientSession | None = None) -> LMCacheClient:
        cfg = self.config
        assert cfg.lmcache_endpoint is not None
        breaker = cfg.circuit_breaker.build(name, on_change=self._breaker_changed)
        self.metrics.breaker_state(breaker.state, "actions" if name == "lmcache-actions" else "lookup")
        return LMCacheClient(cfg.lmcache_endpoint, self.services.http, request_timeout=cfg.request_timeout,
                             retry=cfg.retry, breaker=breaker, evict_fallback=cfg.evict_fallback, session=session)

    def _breaker_changed(self, name: str, state: BreakerState) -> None:
        log.warning("%s breaker is now %s", name, state.value)
        self.metrics.breaker_state(state, "actions" if name == "lmcache-actions" else "lookup")

    async def on_request(self, ctx: RequestContext) -> FilterResult:
        hints = ctx[CACHE_HINTS] = await self._hint(ctx)
        ctx.log_fields["routing_reason"] = hints.reason
        return CONTINUE

    async def _hint(self, ctx: RequestContext) -> CacheHints:
        tokens = ctx.get(TOKENS)
        if ctx.cluster is None or tokens is None or not tokens.ids:
            return CacheHints("none", reason="no_tokens")
        endpoints = self.services.clusters.endpoints(ctx.cluster)
        blocks = self._block_match(ctx, endpoints)
        chunks = await self._chunk_hint(ctx, tokens.ids, endpoints, bool(blocks))
        if not blocks or max(blocks.values()) < max(chunks.matched_tokens.values(), default=0):
            return chunks
        merged = {**chunks.matched_tokens}
        for ep, n in blocks.items():
            merged[ep] = max(n, merged.get(ep, 0))
        reason = "prefix_index" if chunks.tier == "none" else f"prefix_index+{chunks.reason}"
        return _hints("prefix-index", merged, reason, endpoints, chunks.lookup_ms)

    def _block_match(self, ctx: RequestContext, endpoints: Sequence[EndpointView]) -> dict[str, int]:
        """The in-process block index's matches among the eligible-or-not endpoints."""
        index = self.services.prefix_index
        keys = prompt_block_keys(ctx)
        if index is None or not keys:
            return {}
        return index.match(keys, [ep.id for ep in endpoints])

    async def _chunk_hint(self, ctx: RequestContext, ids: list[int], endpoints: Sequence[EndpointView],
                          indexed: bool) -> CacheHints:
        """The LMCache tier and the local chunk index (256-token chunks)."""
        assert ctx.cluster is not None
        if len(ids) < CHUNK_SIZE:  # no full chunk: nothing can match, spare the round trip
            return CacheHints("none", reason="short_prompt")
        self.learner.forget_ejected(ctx.cluster, endpoints)
        reason = "no_controller"
        remote: dict[str, int] = {}
        lookup_ms: float | None = None
        if self.lookup is not None:
            self.lookup.refresh_instances(endpoints, self.services.background)
            mode = self._controller_mode(endpoints)
            if mode == "on_request" or (mode == "on_miss" and not indexed):
                found = await self.lookup.lookup(ids, endpoints)
                remote, reason, lookup_ms = found.matched, found.reason, found.seconds * 1000
            elif mode == "off_path" and not indexed:
                reason = "lmcache_off_path" if self._lookup_later(ctx.cluster, ids, endpoints) else "lmcache_dropped"
            else:
                reason = "lmcache_skipped"
        local = self.learner.match(ctx.cluster, endpoints, request_keys(ctx) or [])
        if remote:
            # The index also knows prefixes still being prefilled (taught by response heads),
            # which no controller has heard of yet: a longer one there wins.
            if local and max(local.values()) > max(remote.values()):
                merged = {**remote}
                for ep, n in local.items():
                    merged[ep] = max(n, merged.get(ep, 0))
                return _hints("local-index", merged, "lmcache_shorter", endpoints, lookup_ms)
            return _hints("lmcache", remote, reason, endpoints, lookup_ms)
        if local:
            return _hints("local-index", local, reason, endpoints, lookup_ms)
        return CacheHints("none", lookup_ms=lookup_ms, reason=reason)

    def _controller_mode(self, endpoints: Sequence[EndpointView]) -> str:
        mode = self.config.controller_lookup
        if mode != "auto":
            return mode
        return "off_path" if any(ep.has_event_feed for ep in endpoints) else "on_request"

    def _lookup_later(self, cluster: str, ids: list[int], endpoints: Sequence[EndpointView]) -> bool:
        """A background lookup whose answer teaches the local chunk index (TTL'd), so the
        next request sharing this prefix sees what the controller knows; False if dropped."""
        lookup, learner = self.lookup, self.learner
        assert lookup is not None
        snapshot = list(endpoints)

        async def run() -> None:
            found = await lookup.lookup(ids, snapshot)
            keys = prompt_chunk_keys(ids)
            for endpoint_id, tokens in found.matched.items():
                learner.teach(cluster, endpoint_id, keys[:tokens // CHUNK_SIZE])

        return self.services.background.submit("lmcache-lookup", run)

    async def on_response(self, ctx: RequestContext, head: ResponseHead) -> None:
        self.learner.on_head(ctx, head)

    async def on_complete(self, ctx: RequestContext) -> None:
        hints = ctx.get(CACHE_HINTS)
        self.metrics.decision(hints.tier if hints else "none", (hints.reason if hints else None) or "-",
                              ctx.decision.kind.value if ctx.decision else "-")
        keys = self.learner.on_complete(ctx)
        if self.management is None:
            return
        tokens = ctx.get(TOKENS)
        if keys is not None and tokens is not None and ctx.cluster is not None and ctx.endpoint is not None:
            self.management.record(ctx.cluster, ctx.endpoint, keys, tokens.ids)
        self.management.maybe_run()

    @property
    def manager(self) -> CacheManager | None:
        return self.management.manager if self.management is not None else None


def _hints(tier: Tier, matched: dict[str, int], reason: str, endpoints: Sequence[EndpointView],
           lookup_ms: float | None) -> CacheHints:
    """`preferred_endpoint`: the eligible endpoint with the longest match (None if none is eligible)."""
    eligible = [ep.id for ep in endpoints if ep.id in matched and ep.eligible()]
    preferred = max(eligible, key=lambda ep: matched[ep]) if eligible else None
    return CacheHints(tier, matched, preferred, lookup_ms, reason)
