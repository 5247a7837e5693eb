"""The leanest aiohttp relay: the reference point of `kvgate bench overhead`.

One aiohttp server and one pooled `ClientSession`, as in the gateway, but no
routing table, filters, metrics, header policy, retries or access log: it reads
the body, sends it upstream and streams the answer back. What the gateway costs
beyond this relay is its own work; what this relay costs over the direct path is
the price of an extra aiohttp hop on the machine.

Run: `python -m kvbench.bare_relay --port P --upstream http://127.0.0.1:B`.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web

SESSION_KEY = web.AppKey("bare_relay_session", aiohttp.ClientSession)
UPSTREAM_KEY = web.AppKey("bare_relay_upstream", str)
_RELAYED = ("Content-Type", "Cache-Control")


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {k: v for k in ("Content-Type",) if (v := request.headers.get(k))}
    url = request.app[UPSTREAM_KEY] + request.raw_path
    async with request.app[SESSION_KEY].request(request.method, url, data=body, headers=headers) as upstream:
        out = {k: v for k in _RELAYED if (v := upstream.headers.get(k))}
        if upstream.content_length is not None:  # whole body: head and body in one write
            return web.Response(body=await upstream.read(), status=upstream.status, headers=out)
        response = web.StreamResponse(status=upstream.status, headers=out)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def ready(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def create_relay_app(upstream: str) -> web.Application:
    async def session(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0)
        app[SESSION_KEY] = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                 cookie_jar=aiohttp.DummyCookieJar())
        yield
        await app[SESSION_KEY].close()

    app = web.Application()
    app[UPSTREAM_KEY] = upstream.rstrip("/")
    app.cleanup_ctx.append(session)
    app.router.add_get("/readyz", ready)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bare-relay", description="minimal aiohttp relay (benchmark reference)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(create_relay_app(args.upstream), host="127.0.0.1", port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
