"""Background watch of every endpoint: active health checks and /metrics scrapes.

Health: `unhealthy_threshold` consecutive failed checks take an endpoint out,
`healthy_threshold` passing ones bring it back. Scrapes read vLLM's load gauges
(`vllm:num_requests_running`, `vllm:num_requests_waiting`,
`vllm:kv_cache_usage_perc`, older `vllm:gpu_cache_usage_perc`) for the picker.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.endpoints import BackendLoad, Cluster, Endpoint

log = logging.getLogger("kvgate.monitor")

_GAUGES = {
    "vllm:num_requests_running": "num_requests_running",
    "vllm:num_requests_waiting": "num_requests_waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",
}


def parse_backend_load(text: str) -> BackendLoad:
    """Sum each vLLM gauge over its label sets (one value per engine/model)."""
    load = BackendLoad(scraped_at=time.monotonic())
    for family in text_string_to_metric_families(text):
        attr = _GAUGES.get(family.name)
        if attr is None or (attr == "kv_cache_usage" and load.kv_cache_usage is not None):
            continue
        values = [s.value for s in family.samples if s.name == family.name and math.isfinite(s.value)]
        if values:
            setattr(load, attr, max(values) if attr == "kv_cache_usage" else sum(values))
    return load


class EndpointMonitor:
    """Owns one task per cluster that checks health and scrapes load on an interval."""

    def __init__(self, clusters: list[Cluster], http: httpx.AsyncClient,
                 streaks: Mapping[str, int] | None = None) -> None:
        """`streaks`: a previous monitor's (a reload restarts the monitor over the new clusters)."""
        self._clusters = clusters
        self._http = http
        self._tasks: list[asyncio.Task[None]] = []
        ids = {e.id for c in clusters for e in c.endpoints}
        # endpoint id -> +passes / -failures in a row
        self._streaks: dict[str, int] = {k: v for k, v in (streaks or {}).items() if k in ids}

    @property
    def streaks(self) -> Mapping[str, int]:
        return self._streaks

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(c), name=f"kvgate-monitor-{c.name}") for c in self._clusters]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _run(self, cluster: Cluster) -> None:
        hc = cluster.config.health_check
        next_scrape = 0.0
        while True:
            scrape = time.monotonic() >= next_scrape
            if scrape:
                next_scrape = time.monotonic() + cluster.config.metrics_interval
            results = await asyncio.gather(*(self.check(cluster, ep, scrape) for ep in cluster.endpoints),
                                           return_exceptions=True)
            for ep, result in zip(cluster.endpoints, results, strict=True):
                if isinstance(result, Exception):  # a bug in one check must not stop the watch
                    log.error("health check of %s failed unexpectedly: %r", ep.id, result)
            await asyncio.sleep(min(hc.interval, cluster.config.metrics_interval))

    async def check(self, cluster: Cluster, endpoint: Endpoint, scrape: bool = True) -> None:
        """One health check (and optionally one scrape) of `endpoint`."""
        hc = cluster.config.health_check
        try:
            resp = await self._http.get(endpoint.url + hc.path, timeout=hc.timeout)
            ok = resp.status_code == 200
        except (httpx.HTTPError, OSError, ValueError):
            ok = False
        self._record(endpoint, ok, hc.healthy_threshold, hc.unhealthy_threshold)
        if ok and scrape and endpoint.config.scrape_metrics:
            await self._scrape(endpoint, hc.timeout)

    def _record(self, endpoint: Endpoint, ok: bool, healthy_after: int, unhealthy_after: int) -> None:
        streak = self._streaks.get(endpoint.id, 0)
        streak = max(streak, 0) + 1 if ok else min(streak, 0) - 1
        self._streaks[endpoint.id] = streak
        if ok and not endpoint.healthy and streak >= healthy_after:
            endpoint.set_healthy(True)  # a discovered endpoint's first pass, or a comeback
            log.info("endpoint %s is healthy%s", endpoint.id, " again" if endpoint.stats.health_ejections else "")
        elif not ok and endpoint.healthy and -streak >= unhealthy_after:
            endpoint.set_healthy(False)
            log.warning("endpoint %s failed %d health checks: ejected", endpoint.id, -streak)

    async def _scrape(self, endpoint: Endpoint, timeout: float) -> None:
        try:
            resp = await self._http.get(endpoint.url + "/metrics", timeout=timeout)
            if resp.status_code == 200:
                endpoint.load = parse_backend_load(resp.text)
        except (httpx.HTTPError, OSError, ValueError):
            log.debug("metrics scrape of %s failed", endpoint.id, exc_info=True)
