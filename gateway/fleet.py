"""Endpoints across config generations: which carry over, which drain.

`carry_over_clusters` keeps an endpoint's live object (health, breaker, load,
statistics) while its config stays the same. A leaving endpoint (a reload or
discovery dropped it) is marked `draining`: no request picks it again, not even a
failover of a request still running on an older generation, while the requests
already sent there finish normally. Once its in-flight count is zero it is done:
the caller drops it from the prefix index and closes its KV-event subscription.
If it comes back before that, the same `Endpoint` object returns to service.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from gateway.config import ClusterConfig
from gateway.endpoints import Cluster, ClusterRegistry, Endpoint, build_endpoint
from kvkernel.breaker import CircuitBreakerConfig


class DrainingEndpoints:
    def __init__(self) -> None:
        # endpoint id -> (the endpoint, its cluster's breaker config when it left)
        self._by_id: dict[str, tuple[Endpoint, CircuitBreakerConfig]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def endpoints(self) -> list[Endpoint]:
        return [ep for ep, _ in self._by_id.values()]

    def previous(self) -> dict[str, tuple[Endpoint, CircuitBreakerConfig]]:
        """The draining endpoints by id, for `carry_over_clusters` (one that returns is kept)."""
        return dict(self._by_id)

    def update(self, old: ClusterRegistry, new: ClusterRegistry) -> list[str]:
        """After a swap from `old` to `new`: endpoints whose id is gone start draining, ones
        that are back in `new` stop. Returns the ids that started draining."""
        current = {ep.id: ep for ep in new.all_endpoints()}
        for ep_id in [e for e in self._by_id if e in current]:
            endpoint, _ = self._by_id.pop(ep_id)
            endpoint.draining = False
        left: list[str] = []
        for cluster in old:
            for endpoint in cluster.endpoints:
                if endpoint.id not in current and endpoint.id not in self._by_id:
                    endpoint.draining = True
                    self._by_id[endpoint.id] = (endpoint, cluster.config.circuit_breaker)
                    left.append(endpoint.id)
        return left

    def any_done(self) -> bool:
        return any(ep.inflight == 0 for ep, _ in self._by_id.values())

    def pop_done(self) -> list[Endpoint]:
        """The drained endpoints (no request in flight), no longer tracked."""
        done = [ep for ep, _ in self._by_id.values() if ep.inflight == 0]
        for ep in done:
            del self._by_id[ep.id]
        return done

    def snapshot(self) -> list[dict[str, object]]:
        return [{"id": ep.id, "url": ep.url, "inflight": ep.inflight} for ep, _ in self._by_id.values()]


def carry_over_clusters(old: ClusterRegistry, configs: Sequence[ClusterConfig],
                        draining: Mapping[str, tuple[Endpoint, CircuitBreakerConfig]] | None = None,
                        unproven: Collection[str] = ()) -> ClusterRegistry:
    """New clusters in which every endpoint whose config and breaker config did not change
    is the old `Endpoint` object (health, breaker, load and statistics kept), also one that
    was draining and is back. A new endpoint named in `unproven` starts unhealthy."""
    previous: dict[str, tuple[Endpoint, CircuitBreakerConfig]] = {
        e.id: (e, c.config.circuit_breaker) for c in old for e in c.endpoints}
    previous.update(draining or {})
    clusters: list[Cluster] = []
    for config in configs:
        endpoints: list[Endpoint] = []
        for ep in config.endpoints:
            prior = previous.get(ep.id)
            if prior is not None and prior[0].config == ep and prior[1] == config.circuit_breaker:
                prior[0].max_inflight = config.max_inflight_per_endpoint
                endpoints.append(prior[0])
            else:
                endpoints.append(build_endpoint(config, ep, healthy=ep.id not in unproven))
        clusters.append(Cluster(config, endpoints))  # its outlier tracker sees the endpoints it serves
    return ClusterRegistry(clusters)
