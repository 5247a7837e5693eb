"""The app factory: the only place that wires config, clusters, filters and clients."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import aiohttp
import httpx
from aiohttp import web

from filters.registry import FilterPlan
from gateway import admin, handlers
from gateway.background import BackgroundQueue
from gateway.config import GatewayConfig
from gateway.discovery.watch import DISCOVERY_KEY, Discovery
from gateway.endpoints import ClusterRegistry, build_cluster
from gateway.hygiene import quiet_client_errors
from gateway.kv_feed import KVEventFeed
from gateway.loop_lag import loop_lag_ctx
from gateway.metrics import GatewayMetrics, multiprocess_dir
from gateway.plan import GatewayPlan, plan_gateway
from gateway.reload import GENERATIONS_KEY, Generations
from gateway.routes import RouteTable
from gateway.state import STATE_KEY, GatewayState


def create_app(config: GatewayConfig, plans: GatewayPlan | Sequence[FilterPlan] | None = None,
               monitor: bool = True, config_path: str | None = None) -> web.Application:
    """Build the gateway app. `plans`: a checked `GatewayPlan` (from `plan_gateway`), or
    validated filter plans to check with the config's pickers; `monitor=False` disables
    background health checks (tests drive them by hand); `config_path`: the file a reload
    re-reads (SIGHUP, `POST /admin/reload`). Raises ConfigError."""
    plan = plans if isinstance(plans, GatewayPlan) else plan_gateway(config, plans)
    quiet_client_errors()
    clusters = [build_cluster(c) for c in config.clusters]
    state = GatewayState(
        config=config,
        clusters=ClusterRegistry(clusters),
        pickers={name: p.build() for name, p in plan.pickers.items()},
        metrics=GatewayMetrics(),
        routes=RouteTable(config.routes),
    )
    # lingering_time: after an early answer (408, 413) the unread body is drained for at most 1 s, not 10.
    handler_args = {"max_field_size": 16384, "keepalive_timeout": config.server.limits.keepalive_timeout,
                    "lingering_time": 1.0}
    app = web.Application(client_max_size=config.server.max_body_bytes, handler_args=handler_args)
    app[STATE_KEY] = state
    generations = app[GENERATIONS_KEY] = Generations(state, config_path, monitor_enabled=monitor)
    app.cleanup_ctx.append(_clients(state))
    app.cleanup_ctx.append(_filters(generations, plan))
    app.cleanup_ctx.append(_background(state))  # drains before the filters and clients close
    app.cleanup_ctx.append(_kv_feed(state))
    discovery = app[DISCOVERY_KEY] = Discovery(generations, state.metrics)
    app.cleanup_ctx.append(_discovery(discovery, config))  # before the monitor: it probes what was found
    app.cleanup_ctx.append(loop_lag_ctx(state.loop_lag))
    app.cleanup_ctx.append(_monitor(generations))
    if multiprocess_dir() is not None:
        app.cleanup_ctx.append(_gauge_refresh(state))
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    admin.mount_on_traffic(app, config.server)
    app.router.add_route("*", "/{tail:.*}", handlers.proxy_handler)
    return app


def _clients(state: GatewayState):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        # Idle upstream connections are dropped after 4 s: servers such as uvicorn (vLLM)
        # close theirs after 5 s, and reusing one they just closed costs a retry. Host names
        # (a Kubernetes Service, say) are re-resolved after 10 s, so a moved backend is found soon.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=4, ttl_dns_cache=10)
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


def _filters(generations: Generations, plan: GatewayPlan):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await generations.start(plan)  # the first generation: its chain, its exchange
        yield
        await generations.close()

    return ctx


def _background(state: GatewayState):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        assert state.background is not None
        state.background.start()
        yield
        await state.background.close(timeout=state.drain_time_left(state.config.server.drain_timeout))

    return ctx


def _kv_feed(state: GatewayState):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        feed = state.kv_feed = KVEventFeed(state.clusters.all_endpoints(), state.prefix_index)
        await feed.start()
        yield
        await feed.close()

    return ctx


def _discovery(discovery: Discovery, config: GatewayConfig):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await discovery.start(config)  # a first answer of every source, each within its timeout
        yield
        await discovery.close()

    return ctx


def _monitor(generations: Generations):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        generations.start_monitor()  # a reload restarts it over the new clusters
        yield
        await generations.close_monitor()

    return ctx


def _gauge_refresh(state: GatewayState):  # type: ignore[no-untyped-def]
    """With several workers a scrape reads every worker's gauges from their files: each
    worker keeps its own fresh, not only the one that answers the scrape."""

    async def refresh() -> None:
        while True:
            await asyncio.sleep(1.0)
            handlers.refresh_gauges(state)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(refresh())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx
