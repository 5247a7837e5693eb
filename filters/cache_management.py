"""The cache-management part of the `kvcache` filter: feeds the prefix tracker with
completed requests and, at most once per `cache_strategy.interval`, schedules a
pin/compress/evict round (see `filters.cache_manager`) with the instances' loads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from filters.base import EndpointView, Services
from filters.cache_manager import CacheControl, CacheManager
from filters.cache_strategy import Action, CacheStrategyConfig, InstanceLoad
from filters.instance_map import InstanceMap
from filters.kvcache_metrics import KVCacheMetrics
from kvproto.chunks import CHUNK_SIZE

log = logging.getLogger("kvgate.kvcache")

# (cluster, endpoint id, chunk keys) an evict removed: the learner forgets them.
Forget = Callable[[str, str, Sequence[int]], None]


class CacheManagement:
    def __init__(self, config: CacheStrategyConfig, client: CacheControl, instances: InstanceMap,
                 services: Services, metrics: KVCacheMetrics, forget: Forget) -> None:
        self.config = config
        self.instances = instances
        self.services = services
        self.metrics = metrics
        self._forget = forget
        self.manager = CacheManager(config, client, services.background, chunk_size=CHUNK_SIZE,
                                    on_outcome=self._outcome, on_evicted=self._evicted)

    def record(self, cluster: str, endpoint_id: str, keys: list[int], tokens: list[int]) -> None:
        served = next((ep for ep in self.services.clusters.endpoints(cluster) if ep.id == endpoint_id), None)
        if served is not None:
            self.manager.record(keys, tokens, self.instances.instance_of(served))

    def maybe_run(self) -> None:
        """A rate-limited round; not awaited (the loads are gathered only when one is due)."""
        if self.manager.due():
            self.manager.maybe_run(self.instance_loads(), self.services.gateway_load())

    def all_endpoints(self) -> list[EndpointView]:
        directory = self.services.clusters
        return [ep for cluster in directory.cluster_names() for ep in directory.endpoints(cluster)]

    def instance_loads(self) -> list[InstanceLoad]:
        """One entry per LMCache instance (an instance behind endpoints of several clusters
        counts once, with its highest load and KV usage)."""
        capacity = self.config.endpoint_capacity
        loads: dict[str, InstanceLoad] = {}
        for ep in self.all_endpoints():
            instance = self.instances.instance_of(ep)
            load = max(ep.inflight, ep.num_requests_waiting or 0) / capacity
            kv_usage = ep.kv_cache_usage
            seen = loads.get(instance)
            if seen is not None:
                load, kv_usage = max(load, seen.load or 0.0), _max_known(kv_usage, seen.kv_usage)
            loads[instance] = InstanceLoad(instance, load, kv_usage)
        return list(loads.values())

    def _outcome(self, action: Action, outcome: str) -> None:
        self.metrics.action(action.kind, outcome)
        log.info("cache %s %s on %s (%d tokens): %s", action.kind, outcome, action.instance_id, action.end,
                 action.reason)

    def _evicted(self, instance_id: str, keys: list[int]) -> None:
        directory = self.services.clusters
        for cluster in directory.cluster_names():
            for ep in directory.endpoints(cluster):
                if self.instances.instance_of(ep) == instance_id:
                    self._forget(cluster, ep.id, keys)


def _max_known(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)
