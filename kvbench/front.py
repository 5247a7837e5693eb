"""The round-robin front of `kvgate bench replicas`: one address before N gateway replicas.

Two kinds, the same contract (each request to the next replica in turn, responses
streamed through unbuffered, keep-alive to the replicas):

- `nginx` (Debian's `nginx-light`, found on PATH or in /usr/sbin): a generated config
  in a temp dir (upstream round-robin with keepalive, HTTP/1.1 and `proxy_buffering
  off` for SSE, `listen 127.0.0.1:PORT`, pid, logs and temp paths in that dir,
  `daemon off`), run as a child process;
- `aiohttp`: the relay in this module, `python -m kvbench.front --port P --upstream URL ...`,
  the fallback when nginx is absent (and what the tests use).

`start_front` picks nginx when asked for `auto` and it is installed, else the relay.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from aiohttp import web

from kvbench.oracle import client_session, stream_through
from testbed.procs import HOST, ManagedProcess

FRONTS = ("auto", "nginx", "aiohttp")


class Rotation:
    """The replicas in turn."""

    def __init__(self, upstreams: Sequence[str]) -> None:
        self._cycle = itertools.cycle([u.rstrip("/") for u in upstreams])

    def next(self) -> str:
        return next(self._cycle)


UPSTREAMS = web.AppKey("upstreams", Rotation)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def nginx_binary() -> str | None:
    """nginx on PATH, else Debian's /usr/sbin/nginx (root's PATH may lack /usr/sbin)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def nginx_config(port: int, upstreams: Sequence[str], workdir: Path) -> str:
    """nginx.conf for a round-robin front on 127.0.0.1:`port`; every path it writes is under `workdir`."""
    servers = "".join(f"    server {u.removeprefix('http://')};\n" for u in upstreams)
    temps = "".join(f"  {kind}_temp_path {workdir / kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                             "uwsgi", "scgi"))
    return f"""daemon off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
{temps}  client_body_buffer_size 8m;
  client_max_body_size 64m;
  upstream kvgate {{
{servers}    keepalive 64;
  }}
  server {{
    listen {HOST}:{port};
    location / {{
      proxy_pass http://kvgate;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 300s;
      proxy_send_timeout 300s;
      proxy_next_upstream off;
    }}
  }}
}}
"""


def start_front(kind: str, port: int, upstreams: Sequence[str], workdir: Path) -> tuple[str, ManagedProcess]:
    """Start the front (`auto`: nginx if installed, else the aiohttp relay); returns the kind
    used and its process (not yet known to be ready: poll its URL)."""
    if kind not in FRONTS:
        raise ValueError(f"front must be one of {FRONTS}, got {kind!r}")
    binary = nginx_binary() if kind in ("auto", "nginx") else None
    if kind == "nginx" and binary is None:
        raise RuntimeError("front nginx: no nginx binary (apt-get install -y nginx-light)")
    workdir.mkdir(parents=True, exist_ok=True)
    if binary is not None:
        conf = workdir / "nginx.conf"
        conf.write_text(nginx_config(port, upstreams, workdir))
        argv = [binary, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)]
        return "nginx", ManagedProcess("front-nginx", argv, workdir / "front.log").start()
    argv = [sys.executable, "-m", "kvbench.front", "--port", str(port)]
    for url in upstreams:
        argv += ["--upstream", url]
    return "aiohttp", ManagedProcess("front-aiohttp", argv, workdir / "front.log").start()


# ---- the aiohttp relay ---------------------------------------------------------------------
async def relay(request: web.Request) -> web.StreamResponse:
    return await stream_through(request, request.app[SESSION], request.app[UPSTREAMS].next())


def make_app(upstreams: Sequence[str]) -> web.Application:
    app = web.Application(client_max_size=64 * 2**20)
    app[UPSTREAMS] = Rotation(upstreams)
    app.cleanup_ctx.append(client_session(SESSION, keepalive_timeout=30))
    app.router.add_route("*", "/{path:.*}", relay)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvbench.front", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", action="append", required=True, help="replica base URL (repeat)")
    args = p.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, args.port))
    web.run_app(make_app(args.upstream), sock=sock, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
