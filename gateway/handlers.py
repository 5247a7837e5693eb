"""HTTP handlers: the proxied catch-all route (an `Exchange`) and the gateway's own endpoints."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.admission import AdmissionGate
from gateway.discovery.watch import DISCOVERY_KEY
from gateway.metrics import render
from gateway.reload import GENERATIONS_KEY
from gateway.state import STATE_KEY, GatewayState


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    """Every proxied request: one exchange runs its whole lifecycle, on the config
    generation current when it started (a reload meanwhile does not affect it)."""
    generations = request.app[GENERATIONS_KEY]
    generation = generations.acquire()
    try:
        return await generation.exchange.handle(request)
    finally:
        generations.release(generation)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when not draining and every cluster has at least one eligible endpoint."""
    state = request.app[STATE_KEY]
    clusters = {c.name: sum(1 for e in c.endpoints if e.eligible()) for c in state.clusters}
    ready = not state.draining and all(clusters.values())
    body = {"ready": ready, "draining": state.draining, "eligible_endpoints": clusters}
    return web.json_response(body, status=200 if ready else 503)


async def status(request: web.Request) -> web.Response:
    """`GET /kvgate/status`: live endpoint state, for operators and tests."""
    state = request.app[STATE_KEY]
    generations = request.app[GENERATIONS_KEY]
    bg = state.background.stats if state.background else None
    discovery = request.app.get(DISCOVERY_KEY)
    return web.json_response({
        "inflight": state.inflight,
        "draining": state.draining,
        "admission": gate.stats() if (gate := generations.gate) is not None else None,
        "endpoints": [e.snapshot() for e in state.clusters.all_endpoints()],
        "draining_endpoints": generations.draining.snapshot(),
        "discovery": discovery.status() if discovery is not None else {},
        "pickers": {name: {"type": p.type_name, "state": p.status()} for name, p in state.pickers.items()},
        "prefix_index": state.prefix_index.stats(),
        "event_loop_lag": state.loop_lag.status(),
        "kv_events": state.kv_feed.status() if state.kv_feed is not None else {},
        "background": {"submitted": bg.submitted, "dropped": bg.dropped, "completed": bg.completed,
                       "failed": bg.failed} if bg else None,
    })


def refresh_gauges(state: GatewayState, gate: AdmissionGate | None = None) -> None:
    """Copy live state into the gauges (on scrape; each second too with several workers)."""
    if gate is not None:
        state.metrics.admission_queued.set(gate.queued)
        state.metrics.admission_rejected.set(gate.rejected)
    state.metrics.refresh_endpoints(state.clusters)
    state.metrics.refresh_pickers(state.pickers)
    state.metrics.refresh_loop_lag(state.loop_lag)
    if state.background is not None:
        state.metrics.background_dropped.set(state.background.stats.dropped)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    refresh_gauges(state, request.app[GENERATIONS_KEY].gate)
    body = render(state.metrics.registry)  # every worker's, with server.workers > 1
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
