"""`kvgate bench {overhead,mlx,routing}` — each benchmark lives in its own module."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

BENCHMARKS = {
    "overhead": "kvbench.overhead",
    "mlx": "kvbench.mlx",
    "routing": "kvbench.routing",
    "cache-round": "kvbench.cache_round",
}


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if not args or args[0] not in BENCHMARKS:
        print(f"usage: kvgate bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[args[0]])
    return int(module.main(args[1:]))
