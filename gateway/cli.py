"""The `kvgate` command line: one dispatcher, each subcommand owned by its package.

Subcommands are imported lazily so that `kvgate serve` never pays for MLX or the
testbed, and a broken optional part cannot break the gateway's CLI.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# name -> ("module:function", one-line help). Each function takes argv and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("gateway.serve:main", "run the gateway: kvgate serve -c FILE"),
    "check-config": ("gateway.serve:check_config_main", "validate a config file; exit 0 if valid, 1 if not"),
    "make-tiny-model": ("mlxd.tiny_model:main", "write a seeded tiny Llama + BPE tokenizer model directory"),
    "mlx-serve": ("mlxd.server:main", "run an MLX inference daemon (OpenAI + vLLM-style API)"),
    "mock-lmcache": ("testbed.mock_lmcache.cli:main", "run the mock LMCache controller"),
    "sim-vllm": ("testbed.sim_vllm.cli:main", "run a simulated vLLM backend"),
    "smoke": ("testbed.smoke:main", "run the compose smoke stack (Docker, or local processes)"),
    "demo": ("testbed.demo:main", "start the whole local stack, send a sample workload, summarise routing"),
    "bench": ("kvbench.cli:main", "benchmarks: kvgate bench {overhead,mlx,routing,cache-round}"),
    "report": ("kvreport.cli:main", "an offline HTML ops report from access logs: kvgate report LOG... -o FILE"),
}


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: kvgate <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def _resolve(target: str) -> Callable[[Sequence[str]], int]:
    module_name, func_name = target.split(":")
    module = importlib.import_module(module_name)
    func: Callable[[Sequence[str]], int] = getattr(module, func_name)
    return func


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"kvgate: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return _resolve(SUBCOMMANDS[name][0])(rest)


if __name__ == "__main__":
    raise SystemExit(main())
