"""The app factory: the only place that wires config, clusters, filters and clients."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import aiohttp
import httpx
from aiohttp import web

from filters.base import Services
from filters.registry import FilterPlan, build_filters
from filters.runner import FilterChain
from gateway import handlers
from gateway.background import BackgroundQueue
from gateway.config import GatewayConfig
from gateway.dashboard import dashboard
from gateway.endpoints import ClusterRegistry, build_cluster
from gateway.exchange import Exchange
from gateway.kv_feed import KVEventFeed
from gateway.metrics import GatewayMetrics
from gateway.monitor import EndpointMonitor
from gateway.plan import GatewayPlan, plan_gateway
from gateway.proxy import Proxy
from gateway.state import STATE_KEY, GatewayState


def create_app(config: GatewayConfig, plans: GatewayPlan | Sequence[FilterPlan] | None = None,
               monitor: bool = True) -> web.Application:
    """Build the gateway app. `plans`: a checked `GatewayPlan` (from `plan_gateway`), or
    validated filter plans to check with the config's pickers; `monitor=False` disables
    background health checks (tests drive them by hand). Raises ConfigError."""
    plan = plans if isinstance(plans, GatewayPlan) else plan_gateway(config, plans)
    clusters = [build_cluster(c) for c in config.clusters]
    state = GatewayState(
        config=config,
        clusters=ClusterRegistry(clusters),
        pickers={name: p.build() for name, p in plan.pickers.items()},
        metrics=GatewayMetrics(),
        routes=sorted(((r.match.prefix, r.cluster) for r in config.routes), key=lambda r: -len(r[0])),
    )
    app = web.Application(client_max_size=config.server.max_body_bytes, handler_args={"max_field_size": 16384})
    app[STATE_KEY] = state
    app.cleanup_ctx.append(_clients(state))
    app.cleanup_ctx.append(_filters(state, plan.filters))
    app.cleanup_ctx.append(_background(state))  # drains before the filters and clients close
    app.cleanup_ctx.append(_kv_feed(state))
    if monitor:
        app.cleanup_ctx.append(_monitor(state))
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", handlers.metrics)
    app.router.add_get("/kvgate/status", handlers.status)
    app.router.add_get("/dashboard", dashboard)
    app.router.add_route("*", "/{tail:.*}", handlers.proxy_handler)
    return app


def _clients(state: GatewayState):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        # Idle upstream connections are dropped after 4 s: servers such as uvicorn (vLLM)
        # close theirs after 5 s, and reusing one they just closed costs a retry.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=4, ttl_dns_cache=300)
        state.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              skip_auto_headers=("User-Agent", "Accept-Encoding"),
                                              cookie_jar=aiohttp.DummyCookieJar())
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        state.http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(5.0), trust_env=False)
        # Two workers: a cache-management round (decide() in a thread) must not hold up
        # pin/compress/evict calls queued behind it.
        state.background = BackgroundQueue(state.config.server.background_queue_size, workers=2)
        yield
        await state.session.close()
        await state.http.aclose()

    return ctx


def _filters(state: GatewayState, plans: Sequence[FilterPlan]):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        assert state.session is not None and state.http is not None and state.background is not None
        services = Services(clusters=state.clusters, background=state.background, http=state.http,
                            metrics=state.metrics.registry, gateway_load=state.load,
                            prefix_index=state.prefix_index)
        chain = FilterChain(build_filters(plans, services))
        proxy = Proxy(state.session, state.config.server.debug_headers)
        app[handlers.EXCHANGE_KEY] = Exchange(state, chain, proxy)
        await chain.start()
        yield
        await chain.close()

    return ctx


def _background(state: GatewayState):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        assert state.background is not None
        state.background.start()
        yield
        await state.background.close(timeout=state.config.server.drain_timeout)

    return ctx


def _kv_feed(state: GatewayState):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        feed = state.kv_feed = KVEventFeed(state.clusters.all_endpoints(), state.prefix_index)
        await feed.start()
        yield
        await feed.close()

    return ctx


def _monitor(state: GatewayState):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        assert state.http is not None
        monitor = EndpointMonitor(list(state.clusters), state.http)
        monitor.start()
        yield
        await monitor.close()

    return ctx
