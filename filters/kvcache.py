"""`kvcache` filter: where does this prompt's KV cache live? Writes `ctx.hints`.

Reads `ctx.token_ids` (the `tokenizer` filter) and `ctx.cluster`. On the request
path it makes one LMCache `/lookup` within `lookup_timeout`, maps instance ids to
the cluster's endpoint ids and writes `ctx.hints`: tier "lmcache", matched prefix
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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from filters.base import CONTINUE, EndpointView, Filter, FilterResult, ResponseHead, Services
from filters.cache_manager import CacheManager
from filters.cache_strategy import Action, CacheStrategyConfig, InstanceLoad
from filters.instance_map import InstanceMap, MapMode
from filters.kvcache_metrics import KVCacheMetrics
from filters.lmcache_client import (
    CircuitOpenError,
    LMCacheClient,
    LMCacheError,
    LMCacheUnavailable,
    LookupResult,
)
from filters.local_index import LocalIndexConfig, LocalPrefixIndex, prompt_chunk_keys
from filters.registry import register
from filters.resilience import BreakerSettings, RetrySettings
from gateway.breaker import BreakerState
from gateway.context import RequestContext
from gateway.decode import FieldError, Seconds
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
    config: KVCacheConfig

    def __init__(self, config: KVCacheConfig, name: str, services: Services) -> None:
        super().__init__(config, name, services)
        self.metrics = KVCacheMetrics(services.metrics)
        self.client: LMCacheClient | None = None  # lookups and /query_instance (request path)
        self.actions_client: LMCacheClient | None = None  # background pin/compress/evict
        self.index = LocalPrefixIndex(config.local_index.max_chunks, config.local_index.ttl)
        self.instances = InstanceMap("identity" if config.instance_map == "identity" else "explicit")
        self.manager: CacheManager | None = None
        self._keys: dict[int, list[int]] = {}  # id(ctx) -> chunk keys, between on_request and on_complete
        # id(ctx) -> (index node, keys the response head taught it that it did not hold before)
        self._tentative: dict[int, tuple[str, list[int]]] = {}
        self._ejected: set[str] = set()  # index nodes of endpoints seen ineligible (entries dropped)

    async def start(self) -> None:
        cfg = self.config
        if cfg.lmcache_endpoint is None:
            return
        breaker = cfg.circuit_breaker.build("lmcache", on_change=self._breaker_changed)
        self.client = LMCacheClient(cfg.lmcache_endpoint, self.services.http, request_timeout=cfg.request_timeout,
                                    retry=cfg.retry, breaker=breaker, evict_fallback=cfg.evict_fallback)
        # Background actions get their own breaker: a controller that rejects an action
        # (real LMCache answers 500 to any compress method but "cachegen") must not take
        # lookups, and so routing, down with it.
        actions_breaker = cfg.circuit_breaker.build("lmcache-actions", on_change=self._breaker_changed)
        self.actions_client = LMCacheClient(cfg.lmcache_endpoint, self.services.http,
                                            request_timeout=cfg.request_timeout, retry=cfg.retry,
                                            breaker=actions_breaker, evict_fallback=cfg.evict_fallback)
        self.metrics.breaker_state(breaker.state, "lookup")
        self.metrics.breaker_state(actions_breaker.state, "actions")
        if cfg.instance_map == "query_instance":
            everyone = self._all_endpoints()
            self.instances = InstanceMap("query_instance", query=self.client.query_instance,
                                         all_endpoints=everyone, refresh=cfg.instance_map_refresh)
            self._refresh_instances(everyone)
        if cfg.cache_strategy.enabled:
            self.manager = CacheManager(cfg.cache_strategy, self.actions_client, self.services.background,
                                        chunk_size=CHUNK_SIZE, on_outcome=self._action_outcome,
                                        on_evicted=self._evicted)

    def _breaker_changed(self, name: str, state: BreakerState) -> None:
        log.warning("%s breaker is now %s", name, state.value)
        self.metrics.breaker_state(state, "actions" if name == "lmcache-actions" else "lookup")

    async def on_request(self, ctx: RequestContext) -> FilterResult:
        await self._hint(ctx)
        ctx.log_fields["routing_reason"] = ctx.hints.reason
        return CONTINUE

    async def _hint(self, ctx: RequestContext) -> None:
        hints = ctx.hints
        if ctx.cluster is None or not ctx.token_ids:
            hints.tier, hints.reason = "none", "no_tokens"
            return
        if len(ctx.token_ids) < CHUNK_SIZE:  # no full chunk: nothing can match, spare the round trip
            hints.tier, hints.reason = "none", "short_prompt"
            return
        endpoints = self.services.clusters.endpoints(ctx.cluster)
        self._forget_ejected(ctx.cluster, endpoints)
        reason = "no_controller"
        if self.client is not None:
            self._refresh_instances(endpoints)
            reason = await self._lookup(ctx, endpoints)
        local = self._local_match(ctx.cluster, endpoints, self._request_keys(ctx) or []) \
            if self.config.local_index.enabled else {}
        if hints.tier == "lmcache":
            # The index also knows prefixes still being prefilled (taught by response heads),
            # which no controller has heard of yet: a longer one there wins.
            if local and max(local.values()) > max(hints.matched_tokens.values()):
                merged = {**hints.matched_tokens}
                for ep, n in local.items():
                    merged[ep] = max(n, merged.get(ep, 0))
                _set_hints(ctx, "local-index", merged, "lmcache_shorter", endpoints)
            return
        if local:
            _set_hints(ctx, "local-index", local, reason, endpoints)
            return
        hints.tier, hints.reason = "none", reason

    async def _lookup(self, ctx: RequestContext, endpoints: Sequence[EndpointView]) -> str:
        """One bounded lookup; fills hints on a useful answer; returns the reason string."""
        assert self.client is not None and ctx.token_ids is not None
        t0 = time.perf_counter()
        outcome = "hit"
        try:
            result = await self.client.lookup(ctx.token_ids, timeout=self.config.lookup_timeout,
                                              retry=self.config.lookup_retry)
        except CircuitOpenError:
            outcome = "breaker_open"
        except LMCacheUnavailable:
            spent = time.perf_counter() - t0
            outcome = "timeout" if spent >= self.config.lookup_timeout * 0.95 else "unavailable"
        except LMCacheError as exc:
            log.warning("lmcache lookup failed: %s", exc)
            outcome = "error"
        except Exception:  # a hint is never worth failing the request for
            log.exception("lmcache lookup raised unexpectedly")
            outcome = "error"
        else:
            matched = self._matched(result, endpoints)
            if matched:
                _set_hints(ctx, "lmcache", matched, "lmcache", endpoints)
            else:
                outcome = "miss"
        elapsed = time.perf_counter() - t0
        ctx.hints.lookup_ms = elapsed * 1000
        self.metrics.lookup(outcome, elapsed)
        return "lmcache" if outcome == "hit" else f"lmcache_{outcome}"

    def _matched(self, result: LookupResult, endpoints: Sequence[EndpointView]) -> dict[str, int]:
        to_endpoint = self.instances.to_endpoints(endpoints)
        matched: dict[str, int] = {}
        for instance, (_, tokens) in result.layout.items():
            endpoint = to_endpoint.get(instance)
            if endpoint is not None and tokens > 0:
                matched[endpoint] = max(tokens, matched.get(endpoint, 0))
        return matched

    def _local_match(self, cluster: str, endpoints: Sequence[EndpointView], keys: list[int]) -> dict[str, int]:
        names = {_node(cluster, ep.id): ep.id for ep in endpoints}
        return {names[node]: n for node, n in self.index.match(keys, list(names)).items()}

    def _forget_ejected(self, cluster: str, endpoints: Sequence[EndpointView]) -> None:
        """An endpoint that became ineligible (failed health checks, open breaker) has
        likely lost its cache (crash, restart): drop what the local index said it held,
        once per outage, so it is not preferred for stale prefixes when it returns."""
        for ep in endpoints:
            node = _node(cluster, ep.id)
            if ep.eligible():
                self._ejected.discard(node)
            elif node not in self._ejected:
                self._ejected.add(node)
                self.index.forget(node)

    def _refresh_instances(self, endpoints: Sequence[EndpointView]) -> None:
        for host in self.instances.claim_stale(endpoints):
            if not self.services.background.submit("lmcache-query-instance", _resolver(self.instances, host)):
                self.instances.unclaim(host)  # dropped (queue full): ask again on a later request

    def _request_keys(self, ctx: RequestContext) -> list[int] | None:
        """The prompt's chunk keys (computed once per request), or None if it has no full chunk."""
        tokens = ctx.token_ids
        if tokens is None or len(tokens) < CHUNK_SIZE:
            return None
        keys = self._keys.get(id(ctx))
        if keys is None:
            keys = self._keys[id(ctx)] = prompt_chunk_keys(tokens)
        return keys

    async def on_response(self, ctx: RequestContext, head: ResponseHead) -> None:
        """The chosen endpoint accepted the request: it is computing this prefix now, so the
        next request sharing it should go there too, before any controller hears of it."""
        if self.config.local_index.enabled and ctx.endpoint is not None and 200 <= head.status < 300:
            keys = self._request_keys(ctx)
            if keys is not None:
                node = _node(ctx.cluster or "", ctx.endpoint)
                self._tentative[id(ctx)] = (node, self.index.learn(node, keys))

    async def on_complete(self, ctx: RequestContext) -> None:
        self.metrics.decision(ctx.hints.tier, ctx.hints.reason or "-", ctx.decision)
        try:
            self._complete(ctx)
        finally:
            self._keys.pop(id(ctx), None)
            self._tentative.pop(id(ctx), None)

    def _complete(self, ctx: RequestContext) -> None:
        keys = self._request_keys(ctx)
        if ctx.endpoint is not None and keys is not None:
            if ctx.status is None or not 200 <= ctx.status < 300 or ctx.ttfb_ms is None:
                # No first byte: the prefill did not finish there, whatever on_response assumed.
                # Only what on_response taught is withdrawn: chunks the endpoint held before
                # (a shared system prompt) are still there.
                node, learned = self._tentative.get(id(ctx), ("", []))
                self.index.forget(node, learned)
                return
            if self.config.local_index.enabled:
                self.index.learn(_node(ctx.cluster or "", ctx.endpoint), keys)
            if self.manager is not None:
                self._record(ctx, keys)
        if self.manager is not None and self.manager.due():  # rate-limited round; not awaited
            self.manager.maybe_run(self._instance_loads(), self.services.gateway_load())

    def _record(self, ctx: RequestContext, keys: list[int]) -> None:
        assert self.manager is not None and ctx.token_ids is not None
        endpoints = self.services.clusters.endpoints(ctx.cluster) if ctx.cluster is not None else []
        served = next((ep for ep in endpoints if ep.id == ctx.endpoint), None)
        if served is not None:
            self.manager.record(keys, ctx.token_ids, self.instances.instance_of(served))

    def _all_endpoints(self) -> list[EndpointView]:
        directory = self.services.clusters
        return [ep for cluster in directory.cluster_names() for ep in directory.endpoints(cluster)]

    def _instance_loads(self) -> list[InstanceLoad]:
        """One entry per LMCache instance (an instance behind endpoints of several clusters
        counts once, with its highest load and KV usage)."""
        capacity = self.config.cache_strategy.endpoint_capacity
        loads: dict[str, InstanceLoad] = {}
        for ep in self._all_endpoints():
            instance = self.instances.instance_of(ep)
            load = max(ep.inflight, ep.num_requests_waiting or 0) / capacity
            kv_usage = ep.kv_cache_usage
            seen = loads.get(instance)
            if seen is not None:
                load, kv_usage = max(load, seen.load or 0.0), _max_known(kv_usage, seen.kv_usage)
            loads[instance] = InstanceLoad(instance, load, kv_usage)
        return list(loads.values())

    def _action_outcome(self, action: Action, outcome: str) -> None:
        self.metrics.action(action.kind, outcome)
        log.info("cache %s %s on %s (%d tokens): %s", action.kind, outcome, action.instance_id, action.end,
                 action.reason)

    def _evicted(self, instance_id: str, keys: list[int]) -> None:
        directory = self.services.clusters
        for cluster in directory.cluster_names():
            for ep in directory.endpoints(cluster):
                if self.instances.instance_of(ep) == instance_id:
                    self.index.forget(_node(cluster, ep.id), keys)


def _set_hints(ctx: RequestContext, tier: Literal["lmcache", "local-index"], matched: dict[str, int],
               reason: str, endpoints: Sequence[EndpointView]) -> None:
    """`preferred_endpoint`: the eligible endpoint with the longest match (None if none is eligible)."""
    hints = ctx.hints
    hints.tier, hints.matched_tokens, hints.reason = tier, matched, reason
    eligible = [ep.id for ep in endpoints if ep.id in matched and ep.eligible()]
    hints.preferred_endpoint = max(eligible, key=lambda ep: matched[ep]) if eligible else None


def _node(cluster: str, endpoint_id: str) -> str:
    """The local index's name for an endpoint: endpoint ids are unique only within a cluster."""
    return f"{cluster}\x1f{endpoint_id}"


def _max_known(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _resolver(instances: InstanceMap, host: str) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        await instances.resolve(host)

    return run
