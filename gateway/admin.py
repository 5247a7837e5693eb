"""The admin side: `/metrics`, `/kvgate/status` and `POST /admin/reload`.

Where they are served, from `server:`
- `admin: {host, port}`: on a separate listener (by default 127.0.0.1), and not on
  the traffic port at all;
- else `admin_key_env: NAME`: on the traffic port, behind the key held in that
  environment variable (`Authorization: Bearer KEY` or `x-admin-key: KEY`,
  compared in constant time; 401 in OpenAI's shape otherwise);
- neither: on the traffic port, open, as before, with one warning at start.
With both, the separate listener also requires the key. `/healthz` and `/readyz`
stay on the traffic port, open: load balancers probe them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway import handlers
from gateway.config import ServerConfig
from gateway.dashboard import dashboard
from gateway.discovery.watch import DISCOVERY_KEY
from gateway.reload import GENERATIONS_KEY, ReloadError
from gateway.state import STATE_KEY
from kvkernel.decode import ConfigError
from kvkernel.errors import error_response

log = logging.getLogger("kvgate.admin")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def admin_key(server: ServerConfig) -> str | None:
    """The admin key from `server.admin_key_env`, or None; ConfigError if the variable is unset."""
    if server.admin_key_env is None:
        return None
    value = os.environ.get(server.admin_key_env, "")
    if not value:
        raise ConfigError("server.admin_key_env", f"environment variable {server.admin_key_env} is not set")
    return value


def guarded(handler: Handler, key: str | None) -> Handler:
    """`handler`, answering 401 unless the request carries `key` (constant-time check)."""
    if key is None:
        return handler
    expected = hashlib.sha256(key.encode()).digest()

    async def check(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-admin-key", "")
        if not hmac.compare_digest(hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest(), expected):
            return error_response(401, "admin endpoint: missing or invalid admin key", code="invalid_admin_key",
                                  type_="invalid_request_error", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return check


async def reload_handler(request: web.Request) -> web.Response:
    """`POST /admin/reload`: 200 with the new generation, or 400 with the config's error."""
    try:
        result = await request.app[GENERATIONS_KEY].reload()
    except ReloadError as exc:
        return error_response(400, exc.message, code="invalid_config", param=exc.path or None,
                              type_="invalid_request_error")
    return web.json_response({"status": "reloaded", **result})


def add_admin_routes(app: web.Application, key: str | None) -> None:
    app.router.add_get("/metrics", guarded(handlers.metrics, key))
    app.router.add_get("/kvgate/status", guarded(handlers.status, key))
    app.router.add_get("/dashboard", guarded(dashboard, key))
    app.router.add_post("/admin/reload", guarded(reload_handler, key))


def create_admin_app(traffic: web.Application) -> web.Application:
    """The separate admin listener's app; it shares the traffic app's state (which owns
    every resource), so start it after the traffic app and stop it before."""
    state = traffic[STATE_KEY]
    app = web.Application()
    app[STATE_KEY] = state
    app[GENERATIONS_KEY] = traffic[GENERATIONS_KEY]
    if DISCOVERY_KEY in traffic:
        app[DISCOVERY_KEY] = traffic[DISCOVERY_KEY]
    add_admin_routes(app, admin_key(state.config.server))
    return app


def mount_on_traffic(app: web.Application, server: ServerConfig) -> None:
    """Admin routes on the traffic port, unless a separate listener is configured."""
    if server.admin is not None:
        return
    key = admin_key(server)
    if key is None:
        log.warning("admin endpoints (/metrics, /kvgate/status, /dashboard, /admin/reload) are open on the "
                    "traffic port: "
                    "set server.admin (a separate listener) or server.admin_key_env")
    add_admin_routes(app, key)
