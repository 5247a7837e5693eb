"""The listening port: refuse to share it by accident.

Workers of one gateway share the port with SO_REUSEPORT; a second gateway started
on a port already served would silently take a share of the traffic. So before
listening, `kvgate serve` checks with a plain bind (no SO_REUSEPORT) that nobody
serves the port, unless `server.reuse_port: true` says sharing is intended.
The site itself wraps aiohttp's protocol factory in `server.limits`' connection guard.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

from aiohttp import web

from gateway.admission import ConnectionGuard, LimitsConfig


def port_in_use(host: str, port: int) -> bool:
    """True if something already listens on host:port (port 0 is never in use)."""
    if port == 0:
        return False
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # the real bind reports a bad host
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


class GuardedSite(web.TCPSite):
    """aiohttp's TCPSite with `server.limits`' connection guard around its protocol factory
    (connection cap, first-head timeout); otherwise TCPSite.start as aiohttp writes it."""

    def __init__(self, runner: web.BaseRunner, limits: LimitsConfig, host: str | None = None,
                 port: int | None = None, **kw: Any) -> None:
        super().__init__(runner, host, port, **kw)
        self.guard: ConnectionGuard | None = None
        self._limits = limits

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        self.guard = ConnectionGuard(server, self._limits)
        self._server = await asyncio.get_running_loop().create_server(
            self.guard, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
