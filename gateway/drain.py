"""Endpoints that left the fleet (a reload or discovery dropped them) and drain.

A leaving endpoint is marked `draining`: no request picks it again, not even a
failover of a request still running on an older generation, while the requests
already sent there finish normally. Once its in-flight count is zero it is done:
the caller drops it from the prefix index and closes its KV-event subscription.
If it comes back before that, the same `Endpoint` object returns to service.
"""

from __future__ import annotations

from gateway.endpoints import ClusterRegistry, Endpoint
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
