"""A small HTTP/1.1 keep-alive load generator, run in its own process.

It speaks plain HTTP/1.1 over asyncio streams (Content-Length and chunked
bodies), so its own cost per request stays small next to the servers it drives.
`run_load` sends `count` POSTs over `concurrency` persistent connections and
times each one: latency (request written -> body complete) and time to first
byte (request written -> first body byte). A response counts as answered only
with status 200 and a complete body.

`LoadgenProcess` runs the generator as a child (`python -m kvbench.loadgen`) that
takes one JSON job per stdin line and answers one JSON result per stdout line,
so the load never shares a core's event loop with the server under test.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class LoadJob:
    url: str  # http://127.0.0.1:PORT/v1/completions
    body: dict[str, Any]
    concurrency: int
    count: int
    timeout_s: float = 30.0  # per request; a request over it counts as an error


@dataclass(slots=True)
class LoadResult:
    requests: int = 0  # answered: status 200 and a complete body
    errors: int = 0
    elapsed_s: float = 0.0
    latency_ms: list[float] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)
    bytes_in: int = 0
    error_samples: list[str] = field(default_factory=list)


class HttpError(Exception):
    pass


def build_request(url: str, body: bytes) -> tuple[str, int, bytes]:
    """(host, port, raw request bytes) for a keep-alive JSON POST to `url`."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http:// URLs are supported, got {url!r}")
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = (f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
    return parts.hostname, port, head.encode("ascii") + body


def parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    """Status and lower-cased headers of a response head (without the final blank line)."""
    lines = raw.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
        raise HttpError(f"bad status line {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line[1]), headers


async def _read_chunked(reader: asyncio.StreamReader, t0: float) -> tuple[int, float | None]:
    """Read a chunked body; returns (body bytes, ttfb in ms or None if empty)."""
    total, ttfb = 0, None
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers expected: the final CRLF
            return total, ttfb
        await reader.readexactly(size + 2)
        if ttfb is None:
            ttfb = (time.perf_counter() - t0) * 1000.0
        total += size


async def fetch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                request: bytes) -> tuple[int, float, float, int, bool]:
    """One exchange: (status, latency ms, ttfb ms, body bytes, keep_alive)."""
    t0 = time.perf_counter()
    writer.write(request)
    raw = await reader.readuntil(b"\r\n\r\n")
    status, headers = parse_head(raw[:-4])
    if headers.get("transfer-encoding", "").lower() == "chunked":
        size, ttfb = await _read_chunked(reader, t0)
    elif "content-length" in headers:
        size = int(headers["content-length"])
        await reader.readexactly(size)
        ttfb = None
    else:
        raise HttpError("response has neither Content-Length nor chunked encoding")
    latency = (time.perf_counter() - t0) * 1000.0
    keep_alive = headers.get("connection", "").lower() != "close"
    return status, latency, ttfb if ttfb is not None else latency, size, keep_alive


async def _worker(host: str, port: int, request: bytes, budget: list[int], result: LoadResult,
                  timeout_s: float) -> None:
    """Send requests over one connection until the shared budget is used up."""
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while budget[0] > 0:
        budget[0] -= 1
        try:
            async with asyncio.timeout(timeout_s):
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                status, latency, ttfb, size, keep_alive = await fetch(*conn, request)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, HttpError, ValueError,
                TimeoutError) as exc:
            _record_error(result, f"{type(exc).__name__}: {exc}"[:200])
            _close(conn)
            conn = None
            continue
        if status != 200:
            _record_error(result, f"status {status}")
        else:
            result.requests += 1
            result.latency_ms.append(latency)
            result.ttfb_ms.append(ttfb)
            result.bytes_in += size
        if not keep_alive:
            _close(conn)
            conn = None
    _close(conn)


def _record_error(result: LoadResult, message: str) -> None:
    result.errors += 1
    if len(result.error_samples) < 5:
        result.error_samples.append(message)


def _close(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
    if conn is not None:
        conn[1].close()


async def run_load(job: LoadJob) -> LoadResult:
    """Send `job.count` requests over `job.concurrency` connections; per-request timings."""
    if job.concurrency < 1 or job.count < 1:
        raise ValueError("concurrency and count must be >= 1")
    host, port, request = build_request(job.url, json.dumps(job.body).encode())
    result = LoadResult()
    budget = [job.count]
    t0 = time.perf_counter()
    workers = min(job.concurrency, job.count)
    await asyncio.gather(*(_worker(host, port, request, budget, result, job.timeout_s) for _ in range(workers)))
    result.elapsed_s = time.perf_counter() - t0
    return result


class LoadgenProcess:
    """The load generator as a child process; `run(job)` blocks until the job is done."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> LoadgenProcess:
        self._proc = subprocess.Popen([sys.executable, "-m", "kvbench.loadgen"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, bufsize=1)
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def run(self, job: LoadJob) -> LoadResult:
        assert self._proc is not None and self._proc.stdin and self._proc.stdout, "start() first"
        self._proc.stdin.write(json.dumps(asdict(job)) + "\n")
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited (code {self._proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"load generator failed: {reply['error']}")
        return LoadResult(**reply)

    def close(self) -> None:
        if self._proc is not None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None


def _serve_jobs() -> None:
    """Child side: one JSON job per stdin line -> one JSON result per stdout line."""
    for line in sys.stdin:
        try:
            job = LoadJob(**json.loads(line))
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                reply: dict[str, Any] = asdict(runner.run(run_load(job)))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        _write_all(sys.stdout.fileno(), (json.dumps(reply) + "\n").encode())


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte: a raw (unbuffered, e.g. PYTHONUNBUFFERED) stdout may write only
    part of a large reply to a pipe, and the parent would wait forever for the newline."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    _serve_jobs()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
