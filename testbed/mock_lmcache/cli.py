"""`kvgate mock-lmcache`: the mock LMCache controller, with the real `lmcache_controller` flags."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence

from kvkernel.logfmt import add_log_format_arg, configure_logging
from testbed.mock_lmcache.faults import Faults
from testbed.mock_lmcache.server import MockConfig, MockServer


def _ports(text: str) -> dict[str, int]:
    try:
        ports = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(ports, dict) or not all(isinstance(v, int) for v in ports.values()):
        raise argparse.ArgumentTypeError(
            'expected a JSON object of ports, e.g. {"pull":9001,"reply":9002}'
        )
    return ports


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvgate mock-lmcache", description=__doc__)
    p.add_argument(
        "--host", default="127.0.0.1", help="bind address for HTTP and ZMQ (default 127.0.0.1)"
    )
    p.add_argument("--port", type=int, default=9000, help="HTTP API port (default 9000)")
    p.add_argument(
        "--monitor-ports",
        type=_ports,
        default={"pull": 9001, "reply": 9002, "heartbeat": 9003},
        help='ZMQ ports as JSON: {"pull":P,"reply":R,"heartbeat":H} (heartbeat optional)',
    )
    p.add_argument(
        "--monitor-port", type=int, default=None, help="legacy: pull port only (no reply/heartbeat)"
    )
    p.add_argument(
        "--health-check-interval",
        type=float,
        default=-1,
        help="seconds between expiry sweeps of silent workers; <= 0 disables (default)",
    )
    p.add_argument(
        "--lmcache-worker-timeout",
        type=float,
        default=300,
        help="a worker without heartbeat for this many seconds is deregistered",
    )
    p.add_argument(
        "--worker-call-timeout",
        type=float,
        default=10.0,
        help="mock only: time box for a control message to a worker (real: none)",
    )
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument(
        "--worker-list-ttl",
        type=float,
        default=30.0,
        help="seconds the all-workers list is cached (LMCache: 30); 0 = always fresh",
    )
    p.add_argument(
        "--no-evict",
        dest="evict",
        action="store_false",
        help="disable /evict (404, like the real controller)",
    )
    p.add_argument(
        "--admin-port",
        type=int,
        default=None,
        help="extra listener for /admin/faults that stays up while the API is 'down'",
    )
    f = p.add_argument_group("fault injection (also at run time: POST /admin/faults)")
    f.add_argument("--latency-ms", type=float, default=0.0)
    f.add_argument("--error-rate", type=float, default=0.0)
    f.add_argument("--hang", action="store_true")
    f.add_argument("--down", action="store_true")
    f.add_argument("--stale", action="store_true")
    f.add_argument(
        "--fault-paths", default="", help="comma-separated path prefixes faults apply to"
    )
    f.add_argument("--seed", type=int, default=0, help="seed of the error_rate RNG")
    p.add_argument("--log-level", default="INFO")
    add_log_format_arg(p)
    return p


def config_from_args(args: argparse.Namespace) -> MockConfig:
    if args.monitor_port:
        raise ValueError(
            "--monitor-port (pull only) is not supported: workers need a reply port; "
            "use --monitor-ports"
        )
    faults = Faults(
        latency_ms=args.latency_ms,
        error_rate=args.error_rate,
        hang=args.hang,
        down=args.down,
        stale=args.stale,
        seed=args.seed,
        paths=[p for p in args.fault_paths.split(",") if p],
    )
    return MockConfig(
        host=args.host,
        port=args.port,
        monitor_ports=args.monitor_ports,
        admin_port=args.admin_port,
        worker_call_timeout=args.worker_call_timeout,
        health_check_interval=args.health_check_interval,
        worker_timeout=args.lmcache_worker_timeout,
        chunk_size=args.chunk_size,
        worker_list_ttl=args.worker_list_ttl,
        evict_enabled=args.evict,
        faults=faults,
    )


async def _serve(config: MockConfig) -> int:
    server = MockServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except OSError as exc:
        print(f"mock-lmcache: cannot listen: {exc}", file=sys.stderr)
        await server.close()
        return 1
    logging.getLogger(__name__).info(
        "mock LMCache controller on http://%s:%d, monitor ports %s",
        config.host,
        server.port,
        dict(config.monitor_ports),
    )
    await stop.wait()
    await server.close()
    return 0


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    configure_logging(args.log_level, args.log_format)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"mock-lmcache: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(config))
