"""HTTP handlers: the proxied catch-all route and the gateway's own endpoints."""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from filters.base import LocalReply, ResponseHead
from gateway.context import CONTEXT_KEY, RequestContext
from gateway.endpoints import Cluster
from gateway.errors import error_response
from gateway.state import STATE_KEY, GatewayState

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _request_id(request: web.Request) -> str:
    """The client's `x-request-id` if it is sane, else 32 random hex digits (an id, not a
    secret: the process-local PRNG, reseeded after fork, costs no system call)."""
    given = request.headers.get("x-request-id", "")
    return given if given and _REQUEST_ID.match(given) else f"{random.getrandbits(128):032x}"


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    """Every proxied request: route, read and check the body, run the chain, forward."""
    state = request.app[STATE_KEY]
    ctx = RequestContext(_request_id(request), request.method, request.path)
    request[CONTEXT_KEY] = ctx
    state.inflight += 1
    try:
        response = await _serve(request, state, ctx)
        ctx.status = response.status
        return response
    except asyncio.CancelledError:
        ctx.error = ctx.error or "cancelled (client gone or shutdown)"
        raise
    finally:
        state.inflight -= 1
        ctx.latency_ms = ctx.elapsed_ms()
        _observe(state, ctx)
        await state.chain.on_complete(ctx)


def _observe(state: GatewayState, ctx: RequestContext) -> None:
    m = state.metrics
    cluster = ctx.cluster or "-"
    m.child(m.requests, cluster, ctx.endpoint or "-", str(ctx.status or 0)).inc()
    if ctx.latency_ms is not None:
        m.child(m.latency, cluster).observe(ctx.latency_ms / 1000)
    if ctx.ttfb_ms is not None:
        m.child(m.ttfb, cluster).observe(ctx.ttfb_ms / 1000)
    if ctx.retries:
        m.child(m.retries, cluster).inc(ctx.retries)


async def _serve(request: web.Request, state: GatewayState, ctx: RequestContext) -> web.StreamResponse:
    matched = state.match_route(request.path)
    if matched is None:
        return _error(ctx, 404, f"no route for path {request.path!r}", "route_not_found")
    ctx.route, cluster = matched[0], matched[1]
    ctx.cluster = cluster.name
    if state.draining:
        return _error(ctx, 503, "gateway is shutting down", "draining", {"Retry-After": "1"})
    problem = await _read_body(request, state, ctx)
    if problem is not None:
        return problem
    if request.method == "GET" and request.path.endswith("/v1/models"):
        return await _merged_models(state, cluster, ctx)
    reply = await state.chain.on_request(ctx)
    if reply is not None:
        return await _local_reply(request, state, ctx, reply)
    assert state.proxy is not None
    return await state.proxy.forward(request, ctx, cluster, state.policies[cluster.name])


def _error(ctx: RequestContext, status: int, message: str, code: str,
           headers: dict[str, str] | None = None, param: str | None = None) -> web.Response:
    ctx.status = status
    ctx.error = message
    resp = error_response(status, message, code=code, param=param, headers=headers)
    resp.headers["x-request-id"] = ctx.request_id
    return resp


async def _read_body(request: web.Request, state: GatewayState, ctx: RequestContext) -> web.Response | None:
    """Read and JSON-parse the body; a 400/413 error response if it is unacceptable."""
    limit = state.config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return _error(ctx, 413, f"request body of {request.content_length} bytes exceeds the limit of {limit}",
                      "body_too_large")
    if not request.body_exists:
        return None
    try:
        ctx.body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _error(ctx, 413, f"request body exceeds the limit of {limit} bytes", "body_too_large")
    except web.RequestPayloadError as exc:  # e.g. a Content-Encoding that does not decode
        return _error(ctx, 400, f"request body could not be read: {exc}", "invalid_body")
    if request.method not in _BODY_METHODS or not ctx.body:
        return None
    # JSON when declared, or when no Content-Type was sent at all (curl -d, some SDKs);
    # any other declared type (octet-stream, form, text) is forwarded untouched.
    ctype = request.content_type
    declared = "Content-Type" in request.headers
    if declared and ctype != "application/json" and not ctype.endswith("+json"):
        return None
    try:
        parsed: Any = json.loads(ctx.body)
    except (ValueError, UnicodeDecodeError) as exc:
        return _error(ctx, 400, f"request body is not valid JSON: {exc}", "invalid_json")
    except RecursionError:
        return _error(ctx, 400, "request body is nested too deeply", "invalid_json")
    if not isinstance(parsed, dict):
        return _error(ctx, 400, f"request body must be a JSON object, got {type(parsed).__name__}", "invalid_json")
    ctx.json = parsed
    return None


async def _local_reply(request: web.Request, state: GatewayState, ctx: RequestContext,
                       reply: LocalReply) -> web.Response:
    head = ResponseHead(reply.status, {**reply.headers, "x-request-id": ctx.request_id})
    await state.chain.on_response(ctx, head)
    ctx.status = reply.status
    ctx.error = ctx.error or str(reply.body.get("error", {}).get("message", ""))[:200] or None
    return web.json_response(reply.body, status=head.status, headers=head.headers)


async def _merged_models(state: GatewayState, cluster: Cluster, ctx: RequestContext) -> web.Response:
    """`GET /v1/models`: the union of every eligible backend's model list (by id)."""
    assert state.http is not None
    http = state.http
    timeout = cluster.config.health_check.timeout * 2

    async def fetch(url: str) -> list[dict[str, Any]]:
        try:
            resp = await http.get(url + "/v1/models", timeout=timeout)
            data = resp.json().get("data", []) if resp.status_code == 200 else []
            return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except Exception:  # noqa: BLE001 - one bad backend must not break the list
            return []

    eligible = [e for e in cluster.endpoints if e.eligible()]
    lists = await asyncio.gather(*(fetch(e.url) for e in eligible))
    merged: dict[str, dict[str, Any]] = {}
    for models in lists:
        for model in models:
            merged.setdefault(model["id"], model)
    ctx.status = 200 if merged or not eligible else 502
    if not eligible:
        return _error(ctx, 503, f"no healthy endpoint in cluster '{cluster.name}'", "no_healthy_endpoint")
    return web.json_response({"object": "list", "data": list(merged.values())},
                             headers={"x-request-id": ctx.request_id})


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
    bg = state.background.stats if state.background else None
    return web.json_response({
        "inflight": state.inflight,
        "draining": state.draining,
        "endpoints": [e.snapshot() for e in state.clusters.all_endpoints()],
        "background": {"submitted": bg.submitted, "dropped": bg.dropped, "completed": bg.completed,
                       "failed": bg.failed} if bg else None,
    })


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.metrics.refresh_endpoints(state.clusters)
    if state.background is not None:
        state.metrics.background_dropped.set(state.background.stats.dropped)
    body = generate_latest(state.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
