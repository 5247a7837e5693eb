"""The oracle router of `kvgate bench routing`: perfect prefix-group affinity.

A tiny aiohttp relay that reads each request's prefix group from the
`x-kvbench-group` header (set by the load generator, which knows the workload),
sends every request of a group to the backend the group was first assigned to,
and assigns a new group to the backend with the fewest requests in flight (ties:
fewest groups, then list order). No tokenizing, no controller: it shows what
routing by prefix could achieve when the router knows the answer, at the cost of
a plain relay. Responses are streamed through unbuffered.

Run as `python -m kvbench.oracle --port P --backend URL [--backend URL ...]`.
"""

from __future__ import annotations

import argparse
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence

import aiohttp
from aiohttp import web

from kvbench.workloads import GROUP_HEADER

BACKENDS = web.AppKey("backends", list)
ASSIGNED = web.AppKey("assigned", dict)
INFLIGHT = web.AppKey("inflight", Counter)
SESSION = web.AppKey("session", aiohttp.ClientSession)
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


def choose(group: str | None, backends: list[str], assigned: dict[str, str], inflight: Counter[str]) -> str:
    """The backend for `group` (assigning it on first sight); no group: least in flight."""
    if group is not None and group in assigned:
        return assigned[group]
    groups = Counter(assigned.values())
    best = min(backends, key=lambda b: (inflight[b], groups[b], backends.index(b)))
    if group is not None:
        assigned[group] = best
    return best


async def relay(request: web.Request) -> web.StreamResponse:
    app = request.app
    backend = choose(request.headers.get(GROUP_HEADER), app[BACKENDS], app[ASSIGNED], app[INFLIGHT])
    app[INFLIGHT][backend] += 1
    try:
        return await stream_through(request, app[SESSION], backend, {"x-kvbench-backend": backend})
    finally:
        app[INFLIGHT][backend] -= 1


async def stream_through(request: web.Request, session: aiohttp.ClientSession, base_url: str,
                         extra_headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Relay `request` to `base_url` + its path, the response streamed back unbuffered
    (hop-by-hop headers dropped both ways); the benchmarks' small relays share it."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
    body = await request.read()
    async with session.request(request.method, base_url + request.path_qs, data=body, headers=headers) as upstream:
        resp = web.StreamResponse(status=upstream.status, headers={
            k: v for k, v in upstream.headers.items() if k.lower() not in _HOP | {"content-encoding"}})
        resp.headers.update(extra_headers or {})
        await resp.prepare(request)
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"backends": request.app[BACKENDS], "groups": len(request.app[ASSIGNED])})


def client_session(key: web.AppKey[aiohttp.ClientSession],
                   keepalive_timeout: float) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that keeps an upstream session (no total timeout, no decompression) under `key`."""
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=keepalive_timeout)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=2)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
            app[key] = session
            yield

    return ctx


def make_app(backends: Sequence[str]) -> web.Application:
    app = web.Application(client_max_size=64 * 2**20)
    app[BACKENDS] = list(backends)
    app[ASSIGNED] = {}
    app[INFLIGHT] = Counter()
    app.cleanup_ctx.append(client_session(SESSION, keepalive_timeout=4))
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{path:.*}", relay)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvbench.oracle", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backend", action="append", required=True, help="backend base URL (repeat)")
    args = p.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    web.run_app(make_app([b.rstrip("/") for b in args.backend]), sock=sock, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
