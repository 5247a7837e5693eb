"""`kvgate sim-vllm --id ID --port P [--host 127.0.0.1] [--lmcache-controller HOST --lmcache-ports JSON]
[--kv-events-port P [--kv-events-replay-port R]]`.

Runs one simulated vLLM backend. Every rate and size is a flag, so one machine
can run a fleet; `--help` lists them with their defaults. With `--kv-events-port`
it publishes vLLM-format KV events for its prefix cache; `GET /kvgate/kv-events`
tells the bound ports (see `kvproto.kv_events_app`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from kvkernel.logfmt import add_log_format_arg, configure_logging
from kvproto.chunks import CHUNK_SIZE, chunk_keys
from kvproto.kv_events_app import KVEventSink, add_kv_events_args, kv_events_config, setup_kv_events
from testbed.sim_vllm.cache import PrefixCache
from testbed.sim_vllm.engine import Engine, EngineConfig
from testbed.sim_vllm.reporting import ChunkSink, ControllerConfig, reporting_ctx
from testbed.sim_vllm.server import make_app
from testbed.sim_vllm.tokenizer import load_tokenizer

DEFAULTS = EngineConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvgate sim-vllm", description="Run a simulated vLLM backend.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--id", required=True, help="backend id = LMCache instance id")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model", type=Path, help="model dir whose tokenizer.json to use (default: hash tokenizer)")
    p.add_argument("--served-model-name", help="model name in the API (default: the model dir's name, else sim-vllm)")
    p.add_argument("--vocab-size", type=int, default=1 << 17, help="hash tokenizer vocabulary size")
    p.add_argument("--block-size", type=int, default=DEFAULTS.block_size, help="tokens per KV block")
    p.add_argument("--capacity-blocks", type=int, default=DEFAULTS.capacity_blocks, help="KV blocks in the cache")
    p.add_argument("--max-num-seqs", type=int, default=DEFAULTS.max_num_seqs, help="concurrent sequences")
    p.add_argument("--prefill-slots", type=int, default=DEFAULTS.prefill_slots, help="concurrent prefills")
    p.add_argument("--prefill-rate", type=float, default=DEFAULTS.prefill_rate, help="prefill tokens/s")
    p.add_argument("--decode-rate", type=float, default=DEFAULTS.decode_rate, help="decode tokens/s per sequence")
    p.add_argument("--decompress-rate", type=float, default=DEFAULTS.decompress_rate,
                   help="tokens/s to restore compressed blocks on a hit")
    p.add_argument("--base-latency-ms", type=float, default=DEFAULTS.base_latency * 1000,
                   help="fixed ms added to every prefill")
    p.add_argument("--decode-batch-penalty", type=float, default=DEFAULTS.decode_batch_penalty,
                   help="TPOT grows by this fraction per extra running sequence")
    p.add_argument("--max-model-len", type=int, default=DEFAULTS.max_model_len)
    p.add_argument("--queued-prefill-gauge", choices=("waiting", "running"), default="waiting",
                   help="where a request queued for prefill counts: num_requests_waiting (as vLLM until it "
                        "schedules the request) or num_requests_running")
    p.add_argument("--lmcache-controller", metavar="HOST", help="LMCache controller host to report chunks to")
    p.add_argument("--lmcache-ports", metavar="JSON",
                   help='controller monitor ports: {"pull":P,"reply":R,"heartbeat":H}')
    p.add_argument("--lmcache-worker-ip", default="127.0.0.1",
                   help="address the control REP socket binds and the controller connects to")
    p.add_argument("--lmcache-worker-port", type=int, default=0, help="control REP port (0: any free)")
    p.add_argument("--heartbeat-interval", type=float, default=2.0, help="seconds between heartbeats")
    add_kv_events_args(p)
    p.add_argument("--log-level", default="INFO")
    add_log_format_arg(p)
    return p


def _controller(args: argparse.Namespace) -> ControllerConfig | None:
    if not args.lmcache_controller:
        if args.lmcache_ports:
            raise ValueError("--lmcache-ports needs --lmcache-controller")
        return None
    if not args.lmcache_ports:
        raise ValueError("--lmcache-controller needs --lmcache-ports")
    try:
        ports = json.loads(args.lmcache_ports)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--lmcache-ports is not JSON: {exc}") from exc
    if not isinstance(ports, dict) or not all(isinstance(v, int) for v in ports.values()):
        raise ValueError('--lmcache-ports must be {"pull":int,"reply":int,"heartbeat":int}')
    return ControllerConfig(args.lmcache_controller, ports, args.heartbeat_interval,
                            args.lmcache_worker_ip, args.lmcache_worker_port)


def build_app(args: argparse.Namespace) -> web.Application:
    """The configured app (raises ValueError on a bad flag combination or value)."""
    config = EngineConfig(block_size=args.block_size, capacity_blocks=args.capacity_blocks,
                          max_num_seqs=args.max_num_seqs, prefill_slots=args.prefill_slots,
                          prefill_rate=args.prefill_rate, decode_rate=args.decode_rate,
                          decompress_rate=args.decompress_rate, base_latency=args.base_latency_ms / 1000,
                          max_model_len=args.max_model_len, decode_batch_penalty=args.decode_batch_penalty,
                          waiting_until_prefill=args.queued_prefill_gauge == "waiting")
    controller = _controller(args)
    events_config = kv_events_config(args, args.host)
    sink = ChunkSink()
    events = KVEventSink(config.block_size)
    cache = PrefixCache(config.block_size, config.capacity_blocks, chunk_size=CHUNK_SIZE,
                        chunk_keys=chunk_keys if controller else None, on_admit=sink.admit, on_evict=sink.evict,
                        block_events=events)
    tokenizer = load_tokenizer(args.model, args.vocab_size)
    model = args.served_model_name or (args.model.resolve().name if args.model else "sim-vllm")
    app = make_app(Engine(config, tokenizer, cache), model=model, instance_id=args.id, sink=sink)
    setup_kv_events(app, events_config, events)
    if controller is not None:
        app.cleanup_ctx.append(reporting_ctx(controller, args.id, cache, sink))
    return app


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    configure_logging(args.log_level, args.log_format, "%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        app = build_app(args)
    except ValueError as exc:
        print(f"kvgate sim-vllm: {exc}", file=sys.stderr)
        return 2

    def listening(_: str) -> None:  # run_app calls it once the socket is bound
        logging.getLogger("sim_vllm").info("sim-vllm %s listening on http://%s:%d", args.id, args.host, args.port)

    # handler_cancellation: a client that goes away cancels its request (freeing its
    # sequence slot), as vLLM aborts it. A port that is taken is reported by `kvgate`'s
    # dispatcher in one line.
    web.run_app(app, host=args.host, port=args.port, print=listening, access_log=None, handler_cancellation=True)
    return 0
