"""`kvcache` filter: where does this prompt's KV cache live? Writes `CACHE_HINTS`.

Reads `TOKENS` (the `tokenizer` filter) and `ctx.cluster`. On the request
path it makes one LMCache `/lookup` within `lookup_timeout`, maps instance ids to
the cluster's endpoint ids and writes `CACHE_HINTS`: tier "lmcache", matched prefix
tokens per endpoint, the preferred (most matched) endpoint, `lookup_ms`, and a
`reason`. If the controller is slow, down, behind an open breaker, or knows
nothing useful, the local prefix index (learned from this gateway's own completed
requests) answers instead: tier "local-index"; else tier "none". A longer prefix in
the local index (one still being prefilled) beats a shorter controller match.
`preferred_endpoint` is always an eligible endpoint (or None). Prompts without a
full 256-token chunk are not looked up (they cannot match).

On completion it teaches the local index which endpoint now holds the prompt's
chunks, feeds the cache-management tracker and, at most once per
`cache_strategy.interval`, schedules a decision round on the background queue
(decided in a worker thread; its pin/compress/evict actions go on that queue
too). It never fails a request: every controller problem degrades to a tier.

Three parts, one module each: lookup (`filters.cache_lookup`), learning
(`filters.cache_learning`), cache management (`filters.cache_management`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from filters.base import CONTINUE, EndpointView, Filter, FilterResult, ResponseHead, Services
from filters.cache_learning import PrefixLearner, request_keys
from filters.cache_lookup import ControllerLookup
from filters.cache_management import CacheManagement
from filters.cache_manager import CacheManager
from filters.cache_strategy import CacheStrategyConfig
from filters.instance_map import InstanceMap, MapMode
from filters.keys import CACHE_HINTS, TOKENS, CacheHints, Tier
from filters.kvcache_metrics import KVCacheMetrics
from filters.lmcache_client import LMCacheClient
from filters.local_index import LocalIndexConfig, LocalPrefixIndex
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
        client = self._client("lmcache")
        # Background actions get their own breaker: a controller that rejects an action
        # (real LMCache answers 500 to any compress method but "cachegen") must not take
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

    def _client(self, name: str) -> LMCacheClient:
        cfg = self.config
        assert cfg.lmcache_endpoint is not None
        breaker = cfg.circuit_breaker.build(name, on_change=self._breaker_changed)
        self.metrics.breaker_state(breaker.state, "actions" if name == "lmcache-actions" else "lookup")
        return LMCacheClient(cfg.lmcache_endpoint, self.services.http, request_timeout=cfg.request_timeout,
                             retry=cfg.retry, breaker=breaker, evict_fallback=cfg.evict_fallback)

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
        if len(tokens.ids) < CHUNK_SIZE:  # no full chunk: nothing can match, spare the round trip
            return CacheHints("none", reason="short_prompt")
        endpoints = self.services.clusters.endpoints(ctx.cluster)
        self.learner.forget_ejected(ctx.cluster, endpoints)
        reason = "no_controller"
        remote: dict[str, int] = {}
        lookup_ms: float | None = None
        if self.lookup is not None:
            self.lookup.refresh_instances(endpoints, self.services.background)
            found = await self.lookup.lookup(tokens.ids, endpoints)
            remote, reason, lookup_ms = found.matched, found.reason, found.seconds * 1000
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
