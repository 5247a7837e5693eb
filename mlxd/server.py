"""`kvgate mlx-serve`: the MLX daemon's app factory and command line.

    kvgate mlx-serve --model DIR --id ID --port P [--host 127.0.0.1]
        [--lmcache-controller HOST --lmcache-ports '{"pull":..,"reply":..,"heartbeat":..}']
        [--kv-events-port P [--kv-events-replay-port R]]

The server listens at once; `/health` answers 503 until the engine thread has
loaded the model, then 200. The LMCache instance id is `--id`. With
`--kv-events-port` the prefix cache is also published as vLLM-format KV events
(16-token blocks, see `mlxd.block_events`); `GET /kvgate/kv-events` tells the
bound ports (see `kvproto.kv_events_app`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from kvkernel.logfmt import add_log_format_arg, configure_logging
from kvproto.kv_events_app import (
    KVEventsConfig,
    KVEventSink,
    add_kv_events_args,
    kv_events_config,
    setup_kv_events,
)
from kvtok.chat_tokens import ChatTokenizer
from mlxd import handlers
from mlxd.block_events import BLOCK_SIZE
from mlxd.engine import Engine
from mlxd.engine_types import EngineConfig
from mlxd.handlers import DAEMON, Daemon
from mlxd.metrics import DaemonMetrics
from mlxd.model_info import read_model_info

log = logging.getLogger("mlxd")


@dataclass(frozen=True, slots=True)
class ServeOptions:
    model: Path
    instance_id: str
    served_model_name: str | None = None
    max_running: int = 8
    max_waiting: int = 64
    prefill_step: int = 512
    cache_tokens: int = 32768
    cold_cache_tokens: int = 131072
    lmcache_controller: str | None = None
    lmcache_ports: dict[str, int] | None = None
    lmcache_location: str = "LocalCPUBackend"
    lmcache_worker_port: int = 0
    lmcache_worker_ip: str = "127.0.0.1"
    kv_events: KVEventsConfig | None = None


def create_app(opts: ServeOptions) -> web.Application:
    """Build the daemon app; the engine starts (and loads the model) in `cleanup_ctx`."""
    tokenizer = ChatTokenizer.from_dir(opts.model)
    info = read_model_info(opts.model, tokenizer, opts.served_model_name)
    metrics = DaemonMetrics(info.name)
    cfg = EngineConfig(opts.model, info.eos_token_ids, opts.max_running, opts.max_waiting,
                       opts.prefill_step, opts.cache_tokens, opts.cold_cache_tokens)
    events = KVEventSink(BLOCK_SIZE)
    engine = Engine(cfg, tokenizer, metrics, block_events=events if opts.kv_events else None)
    daemon = Daemon(engine, tokenizer, info, metrics, opts.instance_id)
    if opts.lmcache_controller:
        from mlxd.control import make_reporter

        daemon.reporter = make_reporter(engine, opts.lmcache_controller, opts.lmcache_ports or {},
                                        opts.instance_id, opts.lmcache_location, opts.lmcache_worker_port,
                                        opts.lmcache_worker_ip)
    _register_gauges(daemon)
    app = web.Application(middlewares=[handlers.error_middleware], client_max_size=64 * 2**20)
    app[DAEMON] = daemon
    app.on_shutdown.append(_end_in_flight)
    app.cleanup_ctx.append(_engine_ctx)
    app.cleanup_ctx.append(_reporter_ctx)
    app.router.add_post("/v1/completions", handlers.completions)
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_post("/tokenize", handlers.tokenize)
    app.router.add_post("/detokenize", handlers.detokenize)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/metrics", handlers.metrics)
    app.router.add_get("/cache/stats", handlers.cache_stats)
    setup_kv_events(app, opts.kv_events, events)
    return app


def _register_gauges(d: Daemon) -> None:
    engine, m = d.engine, d.metrics

    def usage() -> float:
        cache = engine.cache
        if cache is None or cache.capacity_tokens == 0:
            return 0.0
        return min(1.0, cache.stats.hot_tokens / cache.capacity_tokens)

    m.gauge("vllm:num_requests_running", "Requests in the decode batch", lambda: engine.running)
    m.gauge("vllm:num_requests_waiting", "Requests queued for the batch", lambda: engine.waiting)
    m.gauge("vllm:kv_cache_usage_perc", "Hot prefix-cache fill (0..1)", usage)
    m.gauge("mlxd_prefix_cache_hot_tokens", "Tokens in the hot tier",
            lambda: engine.cache.stats.hot_tokens if engine.cache else 0)
    m.gauge("mlxd_prefix_cache_cold_tokens", "Tokens in the compressed tier",
            lambda: engine.cache.stats.cold_tokens if engine.cache else 0)
    if d.reporter is not None:
        m.gauge("mlxd_lmcache_registered", "1 when registered with the controller",
                lambda: float(d.reporter.registered))


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    engine = app[DAEMON].engine
    engine.start()
    yield
    await asyncio.to_thread(engine.stop)


async def _end_in_flight(app: web.Application) -> None:
    """Stop the engine before aiohttp waits for (then cancels) in-flight handlers, so
    their requests end with a clear error (a stream: an error event and `[DONE]`)
    instead of being cut off at the shutdown timeout."""
    await asyncio.to_thread(app[DAEMON].engine.stop)


async def _reporter_ctx(app: web.Application) -> AsyncIterator[None]:
    reporter = app[DAEMON].reporter
    if reporter is not None:
        await reporter.start()
    yield
    if reporter is not None:
        await reporter.close()


def _ports(text: str) -> dict[str, int]:
    ports = json.loads(text)
    if not isinstance(ports, dict) or set(ports) != {"pull", "reply", "heartbeat"}:
        raise argparse.ArgumentTypeError('expected {"pull": P, "reply": R, "heartbeat": H}')
    return {k: int(v) for k, v in ports.items()}


def parse_args(argv: Sequence[str]) -> tuple[ServeOptions, str, int]:
    p = argparse.ArgumentParser(prog="kvgate mlx-serve", description="MLX inference daemon")
    p.add_argument("--model", type=Path, required=True, help="mlx-lm model directory")
    p.add_argument("--id", default=None, help="instance id (LMCache instance id); default mlx-PORT")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--served-model-name", default=None, help="model name in the API (default: dir name)")
    p.add_argument("--max-running", type=int, default=8, help="requests decoded together")
    p.add_argument("--max-waiting", type=int, default=64, help="queued requests before 429")
    p.add_argument("--prefill-step", type=int, default=512, help="prompt tokens per prefill step")
    p.add_argument("--cache-tokens", type=int, default=32768, help="hot prefix cache capacity")
    p.add_argument("--cold-cache-tokens", type=int, default=131072, help="zstd tier capacity (0: off)")
    p.add_argument("--lmcache-controller", default=None, help="controller host for KV reporting")
    p.add_argument("--lmcache-ports", type=_ports, default=None, help='{"pull":..,"reply":..,"heartbeat":..}')
    p.add_argument("--lmcache-location", default="LocalCPUBackend")
    p.add_argument("--lmcache-worker-port", type=int, default=0, help="control REP port (0: any free)")
    p.add_argument("--lmcache-worker-ip", default="127.0.0.1",
                   help="IP the control REP socket binds and the controller dials")
    add_kv_events_args(p)
    p.add_argument("--log-level", default="INFO")
    add_log_format_arg(p)
    a = p.parse_args(list(argv))
    if a.lmcache_controller and a.lmcache_ports is None:
        p.error("--lmcache-controller needs --lmcache-ports")
    try:
        kv_events = kv_events_config(a, a.host)
    except ValueError as exc:
        p.error(str(exc))
    configure_logging(a.log_level, a.log_format)
    opts = ServeOptions(a.model, a.id or f"mlx-{a.port}", a.served_model_name, a.max_running,
                        a.max_waiting, a.prefill_step, a.cache_tokens, a.cold_cache_tokens,
                        a.lmcache_controller, a.lmcache_ports, a.lmcache_location, a.lmcache_worker_port,
                        a.lmcache_worker_ip, kv_events)
    return opts, a.host, a.port


def main(argv: Sequence[str]) -> int:
    opts, host, port = parse_args(argv)
    try:
        app = create_app(opts)
    except (OSError, ValueError) as exc:
        print(f"mlx-serve: cannot load {opts.model}: {exc}", file=sys.stderr)
        return 1
    def listening(_: str) -> None:  # run_app calls it once the socket is bound
        log.info("mlx-serve %s on http://%s:%d (model %s)", opts.instance_id, host, port, opts.model)

    try:
        web.run_app(app, host=host, port=port, print=listening, handler_cancellation=True,
                    shutdown_timeout=2.0, access_log=None)
    except OSError as exc:
        print(f"mlx-serve: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    return 0
