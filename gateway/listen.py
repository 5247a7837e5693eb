"""The listening port: refuse to share it by accident.

Workers of one gateway share the port with SO_REUSEPORT; a second gateway started
on a port already served would silently take a share of the traffic. So before
listening, `kvgate serve` checks with a plain bind (no SO_REUSEPORT) that nobody
serves the port, unless `server.reuse_port: true` says sharing is intended.
"""

from __future__ import annotations

import errno
import socket


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
