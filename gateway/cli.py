"""The `kvgate` command line: one dispatcher, each subcommand owned by its package.

Subcommands are imported lazily so that `kvgate serve` never pays for MLX or the
testbed, and a broken optional part cannot break the gateway's CLI. A command whose
extra is not installed says which extra to install instead of printing a traceback.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import sys
from collections.abc import Callable, Sequence

# name -> ("module:function", one-line help). Each function takes argv and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("gateway.serve:main", "run the gateway: kvgate serve -c FILE"),
    "check-config": ("gateway.serve:check_config_main", "validate a config file; exit 0 if valid, 1 if not"),
    "hash-key": ("filters.auth:hash_key_main", "read an API key on stdin, print its `auth` keys-file entry"),
    "make-tiny-model": ("mlxd.tiny_model:main", "write a seeded tiny Llama + BPE tokenizer model directory"),
    "mlx-serve": ("mlxd.server:main", "run an MLX inference daemon (OpenAI + vLLM-style API)"),
    "mock-lmcache": ("testbed.mock_lmcache.cli:main", "run the mock LMCache controller"),
    "sim-vllm": ("testbed.sim_vllm.cli:main", "run a simulated vLLM backend"),
    "smoke": ("testbed.smoke:main", "run the compose smoke stack (Docker, or local processes)"),
    "demo": ("testbed.demo:main", "start the whole local stack, send a sample workload, summarise routing"),
    "bench": ("kvbench.cli:main", "benchmarks: kvgate bench {overhead,mlx,routing,cache-round,soak}"),
    "report": ("kvreport.cli:main", "an offline HTML ops report from access logs: kvgate report LOG... -o FILE"),
}

# The extra that installs each optional command's third-party dependencies.
EXTRAS: dict[str, str] = {
    "make-tiny-model": "mlx",
    "mlx-serve": "mlx",
    "mock-lmcache": "testbed",
    "sim-vllm": "testbed",
    "smoke": "testbed",
    "demo": "testbed",
    "bench": "bench",
}

# Third-party modules only an extra installs: a missing one names its own extra, so that
# `kvgate demo` (which builds a tiny MLX model) or `kvgate bench mlx` point at `mlx`.
MODULE_EXTRAS: dict[str, str] = {
    "mlx": "mlx",
    "mlx_lm": "mlx",
    "numpy": "mlx",
    "zstandard": "mlx",
    "psutil": "bench",
    "matplotlib": "bench",
    "tqdm": "bench",
}

PROJECT_PACKAGES = frozenset({"kvkernel", "kvtok", "kvproto", "filters", "gateway", "mlxd", "testbed", "kvbench"})


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: kvgate <command> [options]  |  kvgate --version", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def _resolve(target: str) -> Callable[[Sequence[str]], int]:
    module_name, func_name = target.split(":")
    module = importlib.import_module(module_name)
    func: Callable[[Sequence[str]], int] = getattr(module, func_name)
    return func


def version() -> str:
    """The installed distribution's version, or the source tree's when not installed."""
    try:
        return importlib.metadata.version("kvgate")
    except importlib.metadata.PackageNotFoundError:
        from gateway import __version__

        return __version__


def missing_extra(command: str, error: ModuleNotFoundError) -> str | None:
    """The extra that would supply the module `error` names, or None if no extra would."""
    top = (error.name or "").split(".")[0]
    if command not in EXTRAS or not top or top in PROJECT_PACKAGES:
        return None
    return MODULE_EXTRAS.get(top, EXTRAS[command])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"kvgate {version()}")
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"kvgate: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return _resolve(SUBCOMMANDS[name][0])(rest)
    except ModuleNotFoundError as error:
        extra = missing_extra(name, error)
        if extra is None:
            raise
        print(f"kvgate {name} needs the {extra!r} extra: pip install 'kvgate[{extra}]'", file=sys.stderr)
        return 2
    except Exception as exc:
        if not is_startup_error(exc):
            raise
        # A busy port, an unreadable file, a socket that cannot bind: one line, not a traceback.
        logging.getLogger("kvgate").debug("%s failed", name, exc_info=True)
        print(f"kvgate {name}: {describe_startup_error(exc)}", file=sys.stderr)
        return 1


def is_startup_error(exc: BaseException) -> bool:
    """Errors of the environment (OS, sockets, ZMQ binds), not bugs: reported in one line."""
    return isinstance(exc, OSError) or type(exc).__name__ == "ZMQError"


def describe_startup_error(exc: BaseException) -> str:
    text = str(exc)
    if "address already in use" in text.lower():
        return f"cannot listen: {text} (is another process using the port?)"
    return text or type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
