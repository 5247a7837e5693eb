"""`kvgate serve` and `kvgate check-config`.

SIGTERM/SIGINT: stop accepting connections, let in-flight requests (streams
included) finish within `server.drain_timeout`, then close everything.
With `server.workers > 1`, that many processes share the port (SO_REUSEPORT) and
their metrics (prometheus-client's multiprocess mode, see `gateway.metrics`).
SIGHUP: reload the config file (see gateway/reload.py); an invalid one is logged
and the running config stays.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence

from aiohttp import web
from prometheus_client import multiprocess

from filters.registry import FilterPlan
from gateway.admin import create_admin_app
from gateway.app import create_app
from gateway.config import GatewayConfig, load_config
from gateway.listen import GuardedSite, port_in_use
from gateway.metrics import enable_multiprocess
from gateway.plan import GatewayPlan, plan_gateway
from gateway.reload import GENERATIONS_KEY, ReloadError
from gateway.state import SHUTDOWN_GRACE, STATE_KEY
from kvkernel.decode import ConfigError
from kvkernel.logfmt import add_log_format_arg, configure_logging

log = logging.getLogger("kvgate.serve")

# Blocked from the start of `main` until a handler is in place, so that a SIGTERM sent
# while the process (or a forked worker) is still starting drains instead of killing it,
# and a SIGHUP (reload) sent then is applied once the gateway runs instead of killing it.
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_EARLY_SIGNALS = _STOP_SIGNALS | {signal.SIGHUP}


def load_and_plan(path: str) -> tuple[GatewayConfig, GatewayPlan]:
    """Load, validate and plan a config file; ConfigError names the YAML path."""
    config = load_config(path)
    return config, plan_gateway(config)


def check_config_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="kvgate check-config", description="Validate a kvgate config file.")
    parser.add_argument("file")
    args = parser.parse_args(argv)
    try:
        config, plans = load_and_plan(args.file)
    except ConfigError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    endpoints = sum(len(c.endpoints) for c in config.clusters)
    print(f"{args.file}: OK ({len(config.clusters)} clusters, {endpoints} endpoints, "
          f"{len(config.routes)} routes, filters: {', '.join(p.name for p in plans.filters) or 'none'})")
    for cluster in config.clusters:
        if cluster.discovery is not None:
            print(f"  cluster {cluster.name}: endpoints discovered from {cluster.discovery.describe()} "
                  f"every {cluster.discovery.interval:g}s")
    return 0


async def run_gateway(config: GatewayConfig, plans: GatewayPlan | Sequence[FilterPlan], reuse_port: bool = False,
                      stop: asyncio.Event | None = None, config_path: str | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then drain and shut down."""
    app = create_app(config, plans, config_path=config_path)
    state = app[STATE_KEY]
    server = config.server
    # handler_cancellation: a client that goes away cancels its request, which closes the
    # upstream connection, so the backend stops generating for nobody.
    # shutdown_timeout: the drain below has already waited for the in-flight requests; what is
    # still running at the deadline gets only a short grace before it is cancelled.
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE,
                           handler_cancellation=True)
    await runner.setup()
    site = GuardedSite(runner, server.limits, server.host, server.port, reuse_port=reuse_port or None, backlog=2048)
    try:
        await site.start()
    except OSError:  # e.g. the port is taken: close what setup opened, report in one line
        await runner.cleanup()
        raise
    admin_runner = await _start_admin(app, reuse_port)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()
    loop.add_signal_handler(signal.SIGHUP, _on_sighup, app, reloads)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _EARLY_SIGNALS)  # a stop or reload that came early is delivered now
    log.info("kvgate listening on http://%s:%d (pid %d)", server.host, server.port, os.getpid())
    await stop.wait()
    log.info("draining %d in-flight requests (up to %.0fs)", state.inflight, server.drain_timeout)
    # One deadline for the whole shutdown: the in-flight requests, then the background
    # queue and the clients share `drain_timeout` (plus a short grace), not one each.
    state.drain_deadline = deadline = loop.time() + server.drain_timeout
    state.draining = True
    await site.stop()  # stop accepting; established connections keep going
    if admin_runner is not None:
        await admin_runner.cleanup()
    while state.inflight > 0 and loop.time() < deadline:  # noqa: ASYNC110 - bounded drain poll
        await asyncio.sleep(0.05)
    await runner.cleanup()
    # Closing the loop puts back the default (fatal) disposition; a second SIGTERM that
    # arrives while the interpreter tears down must not turn a clean exit into a kill.
    signal.pthread_sigmask(signal.SIG_BLOCK, _EARLY_SIGNALS)
    log.info("kvgate stopped")


async def _start_admin(app: web.Application, reuse_port: bool) -> web.AppRunner | None:
    """The separate admin listener (`server.admin`), if configured."""
    admin = app[STATE_KEY].config.server.admin
    if admin is None:
        return None
    runner = web.AppRunner(create_admin_app(app), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, admin.host, admin.port, reuse_port=reuse_port or None).start()
    log.info("kvgate admin endpoints on http://%s:%d", admin.host, admin.port)
    return runner


def _on_sighup(app: web.Application, tasks: set[asyncio.Task[None]]) -> None:
    async def reload() -> None:
        try:
            await app[GENERATIONS_KEY].reload()
        except ReloadError:
            pass  # logged by the reload itself; the running config stays

    task = asyncio.get_running_loop().create_task(reload())
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def tune_gc() -> None:
    """Tune this process's cyclic collector for proxying.

    Proxied requests leave no cyclic garbage (reference counting frees them), yet with
    CPython's default young threshold (700) the tracked objects of 32 in-flight requests
    set off a collection every ~20 requests: ~24 µs of CPU per request under
    `kvgate bench overhead`, and ~30 ms pauses in the p99. At 7000 it almost never runs;
    `gc.freeze()` keeps the start-up heap (modules, config) out of full collections.
    """
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(7000, older, oldest)


def _run(config: GatewayConfig, plans: GatewayPlan, reuse_port: bool, config_path: str | None = None) -> None:
    tune_gc()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(run_gateway(config, plans, reuse_port, config_path=config_path))


def _serve_workers(config: GatewayConfig, plans: GatewayPlan, config_path: str | None = None) -> int:
    """Fork `workers` processes sharing the port; forward SIGTERM/SIGINT/SIGHUP; wait for all.
    Metrics go to a fresh directory the workers share (one consistent `/metrics`)."""
    metrics_dir = tempfile.mkdtemp(prefix="kvgate-metrics-")
    enable_multiprocess(metrics_dir)
    try:
        return _fork_workers(config, plans, config_path)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _fork_workers(config: GatewayConfig, plans: GatewayPlan, config_path: str | None) -> int:
    children = []
    for _ in range(config.server.workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _run(config, plans, reuse_port=True, config_path=config_path)
                code = 0
            except OSError as exc:  # os._exit below would swallow it: say why this worker stops
                print(f"kvgate serve: worker {os.getpid()}: {exc}", file=sys.stderr)
            finally:
                os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)  # each worker reloads on its own
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _EARLY_SIGNALS)
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        multiprocess.mark_process_dead(child)  # type: ignore[no-untyped-call] # its live gauges go
        status = status or os.waitstatus_to_exitcode(code)
    return status


def main(argv: Sequence[str]) -> int:
    # Held until the handlers are in place; given back as it was when no gateway runs
    # (a bad config, a busy port, --help): an in-process caller's children inherit the mask.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _EARLY_SIGNALS)
    try:
        prepared = _prepare(argv)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        raise
    if isinstance(prepared, int):
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return prepared
    config, plans, config_path = prepared
    if config.server.workers > 1:
        return _serve_workers(config, plans, config_path)
    _run(config, plans, reuse_port=config.server.reuse_port, config_path=config_path)
    return 0


def _prepare(argv: Sequence[str]) -> int | tuple[GatewayConfig, GatewayPlan, str]:
    """Parse, load and check everything before serving: (config, plans, path), or an exit code."""
    parser = argparse.ArgumentParser(prog="kvgate serve", description="Run the kvgate gateway.")
    parser.add_argument("-c", "--config", required=True, help="YAML config file")
    parser.add_argument("--port", type=int, help="override server.port")
    parser.add_argument("--log-level", default=os.environ.get("KVGATE_LOG_LEVEL", "INFO"))
    add_log_format_arg(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per health check is noise
    try:
        config, plans = load_and_plan(args.config)
    except ConfigError as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 1
    if args.log_format is None and config.server.log_format != "text":
        configure_logging(args.log_level, config.server.log_format)
    if args.port is not None:
        from dataclasses import replace

        config = replace(config, server=replace(config.server, port=args.port))
    server = config.server
    if not server.reuse_port and port_in_use(server.host, server.port):
        print(f"kvgate serve: {server.host}:{server.port} is already served by another process "
              "(set server.reuse_port: true to share it)", file=sys.stderr)
        return 1
    return config, plans, args.config
