"""`kvgate bench mlx`: the MLX daemon's prefill and decode speed, and TTFT with and without
prefix reuse for a ~1000-token shared prefix.

Starts a real `kvgate mlx-serve` on 127.0.0.1 (with a freshly generated `small`
model unless `--model` is given) and measures over HTTP, as a client sees it:

- cold TTFT: prompts that share nothing with the cache (a unique first line each);
- warm TTFT: prompts that share a ~1000-token prefix with an earlier request;
- prefill tokens/s: prompt tokens / cold TTFT;
- decode tokens/s: one stream (gap between its first and last token), and the
  aggregate of `--concurrency` streams decoding together.

Prints a markdown table and writes it to docs/benchmarks.md (section "mlx").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from kvbench.report import write_section
from kvtok.chat_tokens import ChatTokenizer
from mlxd.tiny_model import write_model
from mlxd.tiny_tokenizer import corpus_text
from testbed.procs import HOST, free_port, start_kvgate


@dataclass(frozen=True, slots=True)
class Shot:
    """One streamed completion as the client saw it."""

    ttft: float
    first_to_last: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


async def stream_completion(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> Shot:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = 0.0
    usage: dict[str, Any] = {}
    async with session.post(url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            elif event["choices"]:  # a token, or the final chunk (the token may have had no text)
                first, last = first or now, now
    return Shot(first - start, last - first, usage["prompt_tokens"], usage["completion_tokens"],
                usage["prompt_tokens_details"]["cached_tokens"])


def prefix_text(tokenizer: ChatTokenizer, n_tokens: int) -> str:
    """About `n_tokens` tokens of the embedded corpus (repeated as needed)."""
    text = corpus_text()
    while len(tokenizer.encode_prompt(text, False)) < n_tokens:
        text += "\n\n" + corpus_text()
    return tokenizer.decode(tokenizer.encode_prompt(text, False)[:n_tokens])


async def measure(url: str, prefix: str, runs: int, decode_tokens: int, concurrency: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        await stream_completion(s, url, "warm up the engine", 2)
        cold = [await stream_completion(s, url, f"{i} is a cold run.\n{prefix}\nQuestion {i}?", 1)
                for i in range(runs)]
        await stream_completion(s, url, f"Shared.\n{prefix}\nQuestion warm-up?", 1)
        warm = [await stream_completion(s, url, f"Shared.\n{prefix}\nQuestion {i}?", 1) for i in range(runs)]
        single = await stream_completion(s, url, "Decode speed:", decode_tokens)
        start = time.perf_counter()
        many = await asyncio.gather(*(stream_completion(s, url, f"Stream {i}:", decode_tokens)
                                      for i in range(concurrency)))
        wall = time.perf_counter() - start
    return {"cold": cold, "warm": warm, "single": single, "many": many, "many_wall": wall}


def render(r: dict[str, Any], model_desc: str, runs: int, concurrency: int) -> str:
    cold_ttft = statistics.median(s.ttft for s in r["cold"])
    warm_ttft = statistics.median(s.ttft for s in r["warm"])
    prompt_tokens = statistics.median(s.prompt_tokens for s in r["cold"])
    cached = min(s.cached_tokens for s in r["warm"])
    single: Shot = r["single"]
    decode = (single.completion_tokens - 1) / single.first_to_last if single.first_to_last else 0.0
    batch_tokens = sum(s.completion_tokens for s in r["many"])
    rows = [
        ("model", model_desc),
        ("prompt tokens (cold / warm)", f"{prompt_tokens:.0f} / {r['warm'][0].prompt_tokens}"),
        ("cached tokens on cold requests (max)", f"{max(s.cached_tokens for s in r['cold'])}"),
        ("cached tokens on warm requests (min)", f"{cached}"),
        (f"TTFT without reuse (median of {runs})", f"{cold_ttft * 1000:.0f} ms"),
        (f"TTFT with prefix reuse (median of {runs})", f"{warm_ttft * 1000:.0f} ms"),
        ("TTFT speed-up from reuse", f"{cold_ttft / warm_ttft:.1f}x"),
        ("prefill throughput (cold prompt tokens / TTFT)", f"{prompt_tokens / cold_ttft:.0f} tokens/s"),
        ("decode, one stream", f"{decode:.0f} tokens/s"),
        (f"decode, {concurrency} concurrent streams (aggregate)", f"{batch_tokens / r['many_wall']:.0f} tokens/s"),
    ]
    lines = ["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    note = ("Measured end to end over HTTP against `kvgate mlx-serve` (TTFT = time to the first "
            "streamed token). Warm requests share a ~1000-token prefix with an earlier request; "
            "their `cached_tokens` shows the reused part.")
    return "### MLX daemon: prefill, decode, prefix reuse\n\n" + note + "\n\n" + "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvgate bench mlx", description="MLX daemon speed and prefix reuse")
    p.add_argument("--model", type=Path, default=None, help="existing model dir (default: generate one)")
    p.add_argument("--preset", default="small", help="preset of the generated model")
    p.add_argument("--prefix-tokens", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    return p.parse_args(list(argv))


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kvbench-mlx-") as tmp:
        model = args.model or write_model(Path(tmp) / args.preset, args.preset, seed=0)
        port = free_port()
        proc = start_kvgate("bench-mlx", ["mlx-serve", "--model", str(model), "--port", str(port),
                                          "--host", HOST, "--id", "bench-mlx"], Path(tmp))
        try:
            url = f"http://{HOST}:{port}"
            proc.wait_http(url + "/health", timeout=120)
            prefix = prefix_text(ChatTokenizer.from_dir(model), args.prefix_tokens)
            results = asyncio.run(measure(url, prefix, args.runs, args.decode_tokens, args.concurrency))
        finally:
            proc.stop()
    desc = f"generated `{args.preset}` preset (seed 0)" if args.model is None else f"`{args.model}`"
    markdown = render(results, desc, args.runs, args.concurrency)
    print(markdown)
    if not args.no_write:
        print(f"written to {write_section('mlx', markdown)}")
    return 0
