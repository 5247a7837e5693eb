"""The mock controller's HTTP API: LMCache 0.5.6's controller endpoints, plus /evict and /admin.

Shapes follow lmcache 0.5.6 `v1/api_server/__main__.py` and its internal API routers:
- every POST takes JSON; a body that does not fit gets 422 `{"detail": [...]}` (as
  FastAPI answers before the handler runs); a failure inside a handler gets 500
  `{"detail": str}`; `event_id`s are made here;
- `/lookup` returns `layout_info` values as `[location, n]` arrays;
- `/compress` and `/decompress` forward an omitted `tokens` as `[]`, as the real one does;
- `/evict {tokens, instance_id}` (the seed design's call, absent from the real
  controller) drops the instance's chunks of `tokens` from the index; when disabled
  it answers 404 like the real controller.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

from kvproto.chunks import chunk_keys
from testbed.mock_lmcache.faults import FaultInjector
from testbed.mock_lmcache.metrics import render_metrics
from testbed.mock_lmcache.state import Registry
from testbed.mock_lmcache.validate import INTS, OPT_INTS, PAIR, STR, BodyError, Spec, read_body
from testbed.mock_lmcache.zmq_side import WorkerCallError, ZmqFrontend


@dataclass
class MockController:
    """Everything the HTTP handlers need; owned by the CLI's serve loop."""

    registry: Registry
    zmq: ZmqFrontend
    faults: FaultInjector
    evict_enabled: bool = True
    http_counts: Counter[tuple[str, int]] = field(default_factory=Counter)


CONTROLLER = web.AppKey("mock_lmcache_controller", MockController)


class OperationError(RuntimeError):
    """A controller operation failed; becomes HTTP 500 {"detail"}."""


def _event(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4()}"


@web.middleware
async def errors_and_counts(
    request: web.Request, handler: Callable[..., Any]
) -> web.StreamResponse:
    """Count responses by route and status; turn handler failures into 500/422 {"detail"}."""
    ctl = request.app[CONTROLLER]
    route = request.match_info.route.resource
    path = route.canonical if route is not None else "unmatched"
    try:
        resp: web.StreamResponse = await handler(request)
    except BodyError as exc:
        resp = web.json_response({"detail": exc.details}, status=422)
    except web.HTTPException as exc:
        ctl.http_counts[(path, exc.status)] += 1
        raise
    except (OperationError, WorkerCallError, KeyError, ValueError) as exc:
        resp = web.json_response({"detail": str(exc)}, status=500)
    ctl.http_counts[(path, resp.status)] += 1
    return resp


async def _forward(
    ctl: MockController, instance_id: str, what: str, build: Callable[[int], dict[str, Any]]
) -> int:
    """Send a control message to every worker of the instance; they must agree on num_tokens."""
    counts = []
    for worker_id, reply in await ctl.zmq.call_instance(instance_id, build):
        if "num_tokens" not in reply:
            raise OperationError(f"worker {worker_id}: {reply.get('error', reply['type'])}")
        counts.append(reply["num_tokens"])
    if len(set(counts)) != 1:
        raise OperationError(f"The number of tokens {what} should be the same across all workers.")
    return int(counts[0])


async def lookup(request: web.Request) -> web.Response:
    ctl = request.app[CONTROLLER]
    body = await read_body(request, {"tokens": INTS})
    layout = ctl.registry.lookup(body["tokens"])
    return web.json_response({"event_id": _event("Lookup"),
                              "layout_info": {k: list(v) for k, v in layout.items()}})  # fmt: skip


async def pin(request: web.Request) -> web.Response:
    ctl = request.app[CONTROLLER]
    body = await read_body(request, {"instance_id": STR, "location": STR, "tokens": INTS})
    event_id = _event("Pin")
    n = await _forward(ctl, body["instance_id"], "pinned", lambda wid: {
        "type": "PinWorkerMsg", "worker_event_id": f"Worker{wid}{event_id}",
        "location": body["location"], "tokens": body["tokens"]})  # fmt: skip
    return web.json_response({"event_id": event_id, "num_tokens": n})


async def clear(request: web.Request) -> web.Response:
    ctl = request.app[CONTROLLER]
    body = await read_body(request, {"instance_id": STR, "location": STR})
    event_id = _event("Clear")
    n = await _forward(ctl, body["instance_id"], "cleared", lambda wid: {
        "type": "ClearWorkerMsg", "worker_event_id": f"Worker{wid}{event_id}",
        "location": body["location"]})  # fmt: skip
    return web.json_response({"event_id": event_id, "num_tokens": n})


def _codec_handler(kind: str, what: str) -> Callable[[web.Request], Any]:
    async def handle(request: web.Request) -> web.Response:
        ctl = request.app[CONTROLLER]
        spec: Spec = {"instance_id": STR, "method": STR, "location": STR, "tokens": (OPT_INTS, [])}
        body = await read_body(request, spec)
        event_id = _event(kind)
        n = await _forward(ctl, body["instance_id"], what, lambda wid: {
            "type": f"{kind}WorkerMsg", "worker_event_id": f"{kind}Worker{wid}{uuid.uuid4()}",
            "method": body["method"], "location": body["location"], "tokens": body["tokens"]})  # fmt: skip
        return web.json_response({"event_id": event_id, "num_tokens": n})

    return handle


async def move(request: web.Request) -> web.Response:
    ctl = request.app[CONTROLLER]
    spec: Spec = {"old_position": PAIR, "new_position": PAIR, "tokens": (OPT_INTS, []),
            "should_copy": ("opt_bool", False)}  # fmt: skip
    body = await read_body(request, spec)
    (src, old_loc), (dst, new_loc) = body["old_position"], body["new_position"]
    dst_workers = ctl.registry.workers(dst)
    for src_w, dst_w in zip(ctl.registry.workers(src), dst_workers, strict=False):
        if dst_w.peer_init_url is None:
            raise OperationError(
                f"Src worker {src_w.worker_id} not registered for instance {src} or dst worker "
                f"{dst_w.worker_id} not registered for instance {dst} or P2P is not enabled.")  # fmt: skip
    urls = {w.worker_id: w.peer_init_url for w in dst_workers}
    event_id = _event("Move")
    n = await _forward(ctl, src, "moved", lambda wid: {
        "type": "MoveWorkerMsg", "worker_event_id": f"MoveWorker{wid}{uuid.uuid4()}",
        "old_position": old_loc, "new_position": [urls.get(wid), new_loc],
        "tokens": body["tokens"], "copy": body["should_copy"]})  # fmt: skip
    return web.json_response({"event_id": event_id, "num_tokens": n})


async def health(request: web.Request) -> web.Response:
    ctl = request.app[CONTROLLER]
    body = await read_body(request, {"instance_id": STR})
    replies = await ctl.zmq.call_instance(body["instance_id"], lambda wid: {
        "type": "HealthWorkerMsg", "worker_event_id": f"HealthWorker{wid}{uuid.uuid4()}"})  # fmt: skip
    codes = {}
    for worker_id, reply in replies:
        if reply["type"] == "HealthWorkerRetMsg":
            codes[str(worker_id)] = reply["error_code"]
        else:  # the real controller's codes: -1001 ErrorMsg, -1002 unexpected reply
            codes[str(worker_id)] = -1001 if reply["type"] == "ErrorMsg" else -1002
    return web.json_response({"event_id": _event("health"), "error_codes": codes})


async def query_instance(request: web.Request) -> web.Response:
    ctl = request.app[CONTROLLER]
    body = await read_body(request, {"event_id": STR, "ip": STR})
    instance_id = ctl.registry.instance_by_ip(body["ip"])
    if instance_id is None:
        raise OperationError(f"no instance registered for ip {body['ip']}")
    return web.json_response({"event_id": _event("QueryInst"), "res": instance_id})


async def query_worker_info(request: web.Request) -> web.Response:
    ctl = request.app[CONTROLLER]
    body = await read_body(request, {"instance_id": STR, "worker_ids": (OPT_INTS, None)})
    iid, wanted = body["instance_id"], body["worker_ids"]
    if iid == "all":
        infos = [
            i for i in ctl.registry.all_worker_infos() if not wanted or i["worker_id"] in wanted
        ]
    else:
        infos = [w.info() for w in ctl.registry.workers(iid) if not wanted or w.worker_id in wanted]
    return web.json_response({"event_id": _event("QueryWorkerInfo"), "worker_infos": infos})


async def evict(request: web.Request) -> web.Response:
    ctl = request.app[CONTROLLER]
    if not ctl.evict_enabled:
        raise web.HTTPNotFound(text='{"detail":"Not Found"}', content_type="application/json")
    body = await read_body(request, {"tokens": INTS, "instance_id": STR})
    keys = chunk_keys(body["tokens"], ctl.registry.chunk_size)
    dropped = ctl.registry.forget(body["instance_id"], keys)
    return web.json_response({"event_id": _event("Evict"),
                              "num_tokens": dropped * ctl.registry.chunk_size})  # fmt: skip


async def workers(request: web.Request) -> web.Response:
    ctl = request.app[CONTROLLER]
    iid, wid = request.query.get("instance_id"), request.query.get("worker_id")
    listed = ctl.registry.workers(iid)
    if wid is not None and iid is not None:
        match = [w for w in listed if str(w.worker_id) == wid]
        if not match:
            return web.json_response({"detail": f"Worker ({iid}, {wid}) not found"}, status=404)
        return web.json_response({**match[0].info(), "key_count": match[0].key_count()})
    if iid is not None and not listed:
        return web.json_response({"detail": f"No workers found for instance {iid}"}, status=404)
    if iid is not None:
        rows = [{**w.info(), "key_count": w.key_count()} for w in listed]
    else:  # the unfiltered list comes from the registry's TTL cache, as in LMCache
        rows = []
        for info in ctl.registry.all_worker_infos():
            worker = ctl.registry.get(info["instance_id"], info["worker_id"])
            rows.append({**info, "key_count": worker.key_count() if worker else 0})
    return web.json_response({"workers": rows, "total_count": len(rows)})


async def key_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[CONTROLLER].registry.key_stats())


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=render_metrics(request.app[CONTROLLER]), content_type="text/plain")


async def get_faults(request: web.Request) -> web.Response:
    injector = request.app[CONTROLLER].faults
    return web.json_response({**asdict(injector.faults), "injected": injector.counters})


async def set_faults(request: web.Request) -> web.Response:
    injector = request.app[CONTROLLER].faults
    try:
        changes = await request.json()
        if not isinstance(changes, dict):
            raise ValueError("body must be a JSON object of fault settings")
        await injector.apply(changes)
    except ValueError as exc:  # includes JSON decode errors
        return web.json_response({"detail": str(exc)}, status=400)
    return await get_faults(request)


async def reset_faults(request: web.Request) -> web.Response:
    injector = request.app[CONTROLLER].faults
    await injector.apply({"latency_ms": 0, "error_rate": 0, "hang": False, "down": False,
                          "stale": False, "paths": [], "down_for_s": 0})  # fmt: skip
    return await get_faults(request)


def add_admin_routes(app: web.Application) -> None:
    app.router.add_get("/admin/faults", get_faults)
    app.router.add_post("/admin/faults", set_faults)
    app.router.add_delete("/admin/faults", reset_faults)


def make_app(ctl: MockController) -> web.Application:
    """The controller's HTTP app (API + admin); faults apply to everything outside /admin."""
    app = web.Application(middlewares=[errors_and_counts, ctl.faults.middleware])
    app[CONTROLLER] = ctl
    posts = {"/lookup": lookup, "/pin": pin, "/clear": clear, "/move": move, "/health": health,
             "/compress": _codec_handler("Compress", "compressed"),
             "/decompress": _codec_handler("Decompress", "decompressed"),
             "/query_instance": query_instance, "/query_worker_info": query_worker_info,
             "/evict": evict}  # fmt: skip
    for path, handler in posts.items():
        app.router.add_post(path, handler)
    app.router.add_get("/controller/workers", workers)
    app.router.add_get("/controller/key-stats", key_stats)
    app.router.add_get("/metrics", metrics)
    add_admin_routes(app)
    return app


def make_admin_app(ctl: MockController) -> web.Application:
    """Admin-only app for `--admin-port`: stays reachable while the API is "down"."""
    app = web.Application(middlewares=[errors_and_counts])
    app[CONTROLLER] = ctl
    add_admin_routes(app)
    app.router.add_get("/metrics", metrics)
    return app
