"""`kvgate bench [-o FILE] {overhead,mlx,routing,cache-round,soak,replicas} [options]` — each benchmark
lives in its own module; results go to FILE (default: ./benchmarks.md, see kvbench.report)."""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Sequence

from kvbench.report import OUTPUT_ENV

BENCHMARKS = {
    "overhead": "kvbench.overhead",
    "mlx": "kvbench.mlx",
    "routing": "kvbench.routing",
    "cache-round": "kvbench.cache_round",
    "soak": "kvbench.soak",
    "replicas": "kvbench.replicas",
}
HELP = {
    "overhead": "the gateway's added latency and CPU against direct and a bare relay",
    "mlx": "prefix reuse on the MLX daemon: TTFT with and without a shared prefix",
    "routing": "routing policies over simulated vLLM backends",
    "cache-round": "a cache-management round off the event loop",
    "soak": "100k requests through the full chain: RSS, open fds and event-loop lag over time",
    "replicas": "N gateway replicas behind a round-robin front against one (hit ratio, TTFT)",
}


def _parser() -> argparse.ArgumentParser:
    width = max(map(len, BENCHMARKS))
    listing = "\n".join(f"  {name:<{width}}  {HELP.get(name, '')}" for name in BENCHMARKS)
    parser = argparse.ArgumentParser(
        prog="kvgate bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a benchmark; `kvgate bench NAME --help` lists its options.",
        epilog=f"benchmarks:\n{listing}")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help=f"markdown file the results go to (default: ${OUTPUT_ENV}, else ./benchmarks.md)")
    parser.add_argument("benchmark", choices=list(BENCHMARKS), metavar="NAME", help="one of: " + ", ".join(BENCHMARKS))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options")
    return parser


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    if args.output:
        os.environ[OUTPUT_ENV] = os.path.abspath(args.output)  # read by kvbench.report at import
    module = importlib.import_module(BENCHMARKS[args.benchmark])
    return int(module.main(args.options))
