"""App singletons, stored under `AppKey`s; only the app factory creates them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
import httpx
from aiohttp import web

from gateway.background import BackgroundQueue
from gateway.config import GatewayConfig
from gateway.endpoints import ClusterRegistry
from gateway.kv_feed import KVEventFeed
from gateway.loop_lag import LoopLag
from gateway.metrics import GatewayMetrics
from gateway.pickers.base import Picker
from gateway.prefix_index import PrefixIndex
from gateway.routes import RouteTable

# Seconds shutdown still gets after the drain deadline: a request still running there is then
# cancelled; the background queue and the clients close within it.
SHUTDOWN_GRACE = 0.5


@dataclass
class GatewayState:
    config: GatewayConfig
    clusters: ClusterRegistry
    pickers: dict[str, Picker]  # cluster name -> its picker
    metrics: GatewayMetrics
    routes: RouteTable  # config order, first match wins
    prefix_index: PrefixIndex = field(default_factory=PrefixIndex)
    kv_feed: KVEventFeed | None = None
    loop_lag: LoopLag = field(default_factory=LoopLag)
    background: BackgroundQueue | None = None
    http: httpx.AsyncClient | None = None
    session: aiohttp.ClientSession | None = None
    inflight: int = 0
    draining: bool = False
    drain_deadline: float | None = None  # loop time by which shutdown must be done (set when draining starts)

    def drain_time_left(self, fallback: float) -> float:
        """Seconds left before the drain deadline (at least a short grace), `fallback` when not draining."""
        if self.drain_deadline is None:
            return fallback
        return max(SHUTDOWN_GRACE, self.drain_deadline - asyncio.get_running_loop().time())

    def load(self) -> float:
        """Gateway load as in-flight requests per endpoint (0 = idle)."""
        total = max(1, len(self.clusters.all_endpoints()))
        return self.inflight / (8.0 * total)


STATE_KEY = web.AppKey("kvgate_state", GatewayState)
