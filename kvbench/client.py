"""The routing suite's load generator: streamed requests, timed on the client side.

`run_workload` sends a workload's sessions over `concurrency` clients (each
client sends one session's requests in order) and returns one `Sample` per
request: TTFT (request sent -> first SSE event), end-to-end latency (-> `[DONE]`),
and the usage the response reported (`stream_options.include_usage`). Every
request carries its prefix group in the `x-kvbench-group` header. A failed
request is a `Sample` with `error` set; nothing is retried.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from kvbench.workloads import GROUP_HEADER, Request, Workload

MODEL = "sim-vllm"


@dataclass(slots=True)
class Sample:
    group: str
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ceiling_tokens: int = 0
    error: str | None = None


def request_body(req: Request, max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL, **req.body, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}


async def send(session: aiohttp.ClientSession, base_url: str, req: Request, max_tokens: int) -> Sample:
    """One streamed request; errors become a Sample with `error` (never raised)."""
    sample = Sample(req.group, ceiling_tokens=req.ceiling_tokens)
    t0 = time.perf_counter()
    try:
        async with session.post(base_url + req.path, json=request_body(req, max_tokens),
                                headers={GROUP_HEADER: req.group}) as resp:
            if resp.status != 200:
                sample.error = f"HTTP {resp.status}: {(await resp.text())[:160]}"
                return sample
            usage = await _read_stream(resp, sample, t0)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[:200]
        return sample
    sample.e2e_ms = (time.perf_counter() - t0) * 1000
    if not usage:
        sample.error = "no usage in the stream"
        return sample
    details = usage.get("prompt_tokens_details") or {}
    sample.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    sample.cached_tokens = int(details.get("cached_tokens") or 0)
    return sample


async def _read_stream(resp: aiohttp.ClientResponse, sample: Sample, t0: float) -> dict[str, Any]:
    usage: dict[str, Any] = {}
    done = False
    async for line in resp.content:
        if not line.startswith(b"data:"):
            continue
        if not sample.ttft_ms:
            sample.ttft_ms = (time.perf_counter() - t0) * 1000
        payload = line[5:].strip()
        if payload == b"[DONE]":
            done = True
            continue
        usage = json.loads(payload).get("usage") or usage
    if not done:
        raise ValueError("stream ended without [DONE]")
    return usage


async def run_workload(base_url: str, workload: Workload, max_tokens: int,
                       on_done: Callable[[Sample], None] = lambda s: None,
                       timeout_s: float = 300.0) -> tuple[list[Sample], float]:
    """All samples (in completion order) and the wall time in seconds."""
    sessions: list[Sequence[Request]] = list(reversed(workload.sessions))
    samples: list[Sample] = []

    async def client(session: aiohttp.ClientSession) -> None:
        while sessions:
            for req in sessions.pop():
                sample = await send(session, base_url, req, max_tokens)
                samples.append(sample)
                on_done(sample)

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(workload.concurrency)))
    return samples, time.perf_counter() - t0
