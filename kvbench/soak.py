"""`kvgate bench soak`: many requests through the whole cache-aware chain, watching the
gateway's resident memory, open file descriptors and event-loop lag over time.

A fake OpenAI backend (`testbed.fake_openai`) and `kvgate serve` with the full chain
(prompt, tokenizer in process from a generated tiny model, kvcache without a
controller, access-log to a file, the `cache_aware` picker) run as subprocesses; a
separate load-generator process sends the requests in chunks, half of them streamed,
with prompts that vary (so the token cache, prefix index and access log all grow and
must stay bounded). After each chunk: the gateway's RSS and open fds (psutil) and its
own `event_loop_lag` (from `/kvgate/status`: the worst lag of a 100 ms wake-up over the
last minute). Flat means: RSS at the end within `--rss-slack` of the first chunk's, fds
unchanged, loop lag bounded.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from kvbench.loadgen import LoadgenProcess, LoadJob
from kvbench.overhead import full_chain_yaml
from kvbench.report import default_path, write_section
from testbed.procs import HOST, ManagedProcess, free_ports, kvgate_cmd


@dataclass(frozen=True)
class Options:  # not slotted: parse_args reads the class defaults
    requests: int = 100_000
    chunk: int = 5_000
    concurrency: int = 32
    prompts: int = 4096  # distinct prompts cycled through (more than the token cache holds)
    rss_slack: float = 0.10  # flat: end RSS within 10 % of the first chunk's
    output: Path | None = None  # markdown file; None: print only


@dataclass(slots=True)
class Sample:
    sent: int
    elapsed_s: float
    rss_mib: float
    fds: int
    loop_lag_max_ms: float
    errors: int


def _prompt(i: int) -> str:
    return f"Ticket {i}: the customer asks about cache routing and prefix reuse for request {i}. " * 4


def _status(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/kvgate/status", timeout=10) as resp:  # noqa: S310
        data: dict[str, object] = json.loads(resp.read())
        return data


def start(workdir: Path) -> tuple[ManagedProcess, ManagedProcess, int, int]:
    from mlxd.tiny_model import write_model

    backend_port, port = free_ports(2)
    write_model(workdir / "model", "tiny", seed=0)
    # A bounded token cache (fewer entries than distinct prompts) and chunk index: both must stay flat.
    (workdir / "gw.yaml").write_text(full_chain_yaml(port, backend_port, workdir / "model", workdir / "access.jsonl",
                                                     token_cache=2000, kvcache="{local_index: {max_chunks: 5000}}"))
    backend = ManagedProcess("backend", [sys.executable, "-m", "testbed.fake_openai", "--port", str(backend_port)],
                             workdir / "backend.log").start()
    gateway = ManagedProcess("gateway", kvgate_cmd("serve", "-c", str(workdir / "gw.yaml"), "--log-level",
                                                   "WARNING"), workdir / "gateway.log").start()
    backend.wait_http(f"http://{HOST}:{backend_port}/health")
    gateway.wait_http(f"http://{HOST}:{port}/readyz")
    return backend, gateway, backend_port, port


def run(opts: Options) -> list[Sample]:
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="kvgate-soak-") as tmp:
        backend, gateway, _, port = start(Path(tmp))
        loadgen = LoadgenProcess().start()
        try:
            assert gateway.proc is not None
            proc = psutil.Process(gateway.proc.pid)
            url, t0, sent, errors = f"http://{HOST}:{port}/v1/completions", time.monotonic(), 0, 0
            while sent < opts.requests:
                n = min(opts.chunk, opts.requests - sent)
                body = {"model": "fake-model", "prompt": _prompt(sent % opts.prompts), "max_tokens": 8,
                        "stream": (sent // opts.chunk) % 2 == 1}
                result = loadgen.run(LoadJob(url, body, opts.concurrency, n))
                sent, errors = sent + n, errors + result.errors
                lag = _status(port).get("event_loop_lag", {})
                samples.append(Sample(sent, time.monotonic() - t0, proc.memory_info().rss / 2**20, proc.num_fds(),
                                      float(lag.get("max_ms", 0.0)) if isinstance(lag, dict) else 0.0, errors))
                print(_row(samples[-1]), file=sys.stderr)
        finally:
            loadgen.close()
            gateway.stop()
            backend.stop()
    return samples


def _row(s: Sample) -> str:
    return (f"| {s.sent} | {s.elapsed_s:.1f} | {s.rss_mib:.1f} | {s.fds} | {s.loop_lag_max_ms:.1f} | "
            f"{s.errors} |")


def render(samples: Sequence[Sample], opts: Options) -> str:
    first, last = samples[0], samples[-1]
    growth = (last.rss_mib - first.rss_mib) / first.rss_mib if first.rss_mib else 0.0
    flat = abs(growth) <= opts.rss_slack and last.fds <= first.fds + 2
    lines = [
        "### Soak (`kvgate bench soak`)",
        "",
        f"{last.sent} requests at concurrency {opts.concurrency} through `kvgate serve` with the whole cache-aware "
        f"chain (prompt, tokenizer in process, kvcache, access-log to a file, the `cache_aware` picker) in front "
        f"of `testbed.fake_openai`; prompts cycle through {opts.prompts} distinct texts, chunks of {opts.chunk} "
        "alternate non-streamed and streamed. After each chunk: the gateway's RSS and open fds (psutil) and "
        "the worst event-loop lag of the last minute (the gateway's own 100 ms wake-up, `/kvgate/status`).",
        "",
        "| requests sent | elapsed s | RSS MiB | open fds | loop lag max ms | errors so far |",
        "|---:|---:|---:|---:|---:|---:|",
        *(_row(s) for s in samples),
        "",
        f"RSS {first.rss_mib:.1f} MiB after the first chunk, {last.rss_mib:.1f} MiB at the end "
        f"({growth:+.1%}); open fds {first.fds} -> {last.fds}; worst loop lag "
        f"{max(s.loop_lag_max_ms for s in samples):.1f} ms; {last.errors} errors. "
        + ("Flat: within the bounds." if flat else f"NOT flat: RSS moved more than {opts.rss_slack:.0%} or fds grew."),
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> Options:
    d = Options()
    p = argparse.ArgumentParser(prog="kvgate bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--chunk", type=int, default=d.chunk, help="requests between two samples")
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--prompts", type=int, default=d.prompts, help="distinct prompts cycled through")
    p.add_argument("--no-write", action="store_true", help="print only; do not write the results file")
    a = p.parse_args(argv)
    if a.requests < 1 or a.chunk < 1 or a.concurrency < 1 or a.prompts < 1:
        p.error("--requests, --chunk, --concurrency and --prompts must be >= 1")
    return Options(a.requests, a.chunk, a.concurrency, a.prompts, d.rss_slack, None if a.no_write else default_path())


def main(argv: Sequence[str]) -> int:
    opts = parse_args(argv)
    samples = run(opts)
    text = render(samples, opts)
    print(text)
    if opts.output is not None:
        print(f"written to {write_section('soak', text, opts.output)}")
    return 0 if samples[-1].errors == 0 else 1
