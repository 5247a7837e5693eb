"""App singletons, stored under `AppKey`s; only the app factory creates them."""

from __future__ import annotations

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

    def load(self) -> float:
        """Gateway load as in-flight requests per endpoint (0 = idle)."""
        total = max(1, len(self.clusters.all_endpoints()))
        return self.inflight / (8.0 * total)


STATE_KEY = web.AppKey("kvgate_state", GatewayState)
