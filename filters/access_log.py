"""`access-log` filter: one JSON line per request, written in `on_complete`.

Prompts are never logged; only `prompt_hash` (a digest of model + prompt). The
routing fields other filters and the proxy add (tier, preferred and chosen
endpoint, predicted vs actual cached tokens, candidate scores) are included.

A file log rotates by size (`max_bytes`): `access.jsonl` -> `access.jsonl.1`
(-> `.1.zst` with `compress: zstd`) ... up to `backups` files. `reopen()` closes
and reopens the path, for external rotation (logrotate + SIGHUP). Schema: docs/observability.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from filters.base import Filter
from filters.keys import CACHE_HINTS, PROMPT, TOKENS, CacheHints, preferred_endpoint
from filters.registry import register
from kvkernel.context import RequestContext
from kvkernel.decode import Bytes, FieldError

log = logging.getLogger("kvgate.access_log")
_NO_HINTS = CacheHints()


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    path: str = "-"  # "-" = stdout
    include_filter_timings: bool = False
    max_bytes: Bytes = 0  # rotate when the file would exceed this; 0 = never
    backups: int = 5  # rotated files kept: path.1 (newest) .. path.N
    compress: Literal["none", "zstd"] = "none"  # compress rotated files (path.1.zst)

    def __post_init__(self) -> None:
        if not self.path:
            raise FieldError("path", "must be a file path or '-' for stdout")
        if self.max_bytes < 0:
            raise FieldError("max_bytes", f"must be >= 0, got {self.max_bytes}")
        if self.backups < 1:
            raise FieldError("backups", f"must be >= 1, got {self.backups}")
        if self.max_bytes and self.path == "-":
            raise FieldError("max_bytes", "stdout cannot be rotated; set a file path")


_encode = json.JSONEncoder(separators=(",", ":")).encode  # one encoder, not one per line
_second: list[Any] = [None, ""]  # (whole second, its formatted prefix): strftime once per second


def _iso(ts: float) -> str:
    whole = int(ts)
    if _second[0] != whole:
        _second[:] = [whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))]
    return f"{_second[1]}.{int(ts % 1 * 1000):03d}Z"


def access_record(ctx: RequestContext, include_filter_timings: bool = False) -> dict[str, Any]:
    """The access-log record of a finished request (no prompt text, only its hash)."""
    prompt = ctx.get(PROMPT)
    hints = ctx.get(CACHE_HINTS) or _NO_HINTS
    tokens = ctx.get(TOKENS)
    decision = ctx.decision
    predicted = hints.matched_tokens.get(ctx.endpoint, 0) if ctx.endpoint else None
    record: dict[str, Any] = {
        "time": _iso(ctx.received_at),
        "request_id": ctx.request_id,
        "method": ctx.method,
        "path": ctx.path,
        "route": ctx.route,
        "cluster": ctx.cluster,
        "model": ctx.model or (prompt.model if prompt else None),
        "prompt_hash": prompt.digest if prompt else None,
        "stream": ctx.stream,
        "endpoint": ctx.endpoint,
        "status": ctx.status,
        "bytes": ctx.bytes_out,
        "latency_ms": round(ctx.latency_ms, 3) if ctx.latency_ms is not None else None,
        "ttfb_ms": round(ctx.ttfb_ms, 3) if ctx.ttfb_ms is not None else None,
        "retries": ctx.retries,
        "error": ctx.error,
        "decision": decision.render() if decision else None,
        "decision_reason": decision.reason or None if decision else None,
        "tier": hints.tier,
        "preferred_endpoint": preferred_endpoint(ctx),
        "prompt_tokens_local": len(tokens.ids) if tokens is not None else None,
        "predicted_cached_tokens": predicted,
        "matched_tokens": hints.matched_tokens or None,
        "lookup_ms": round(hints.lookup_ms, 3) if hints.lookup_ms is not None else None,
        "prompt_tokens": ctx.usage.prompt_tokens,
        "cached_tokens": ctx.usage.cached_tokens,
        "completion_tokens": ctx.usage.completion_tokens,
        "scores": {k: round(v, 3) for k, v in ctx.scores.items()} or None,
    }
    if include_filter_timings:
        record["filter_ms"] = {k: round(v, 3) for k, v in ctx.filter_ms.items()}
    record.update(ctx.log_fields)
    return record


def _compress(path: Path) -> None:
    """path -> path.zst (written aside, then renamed), then path is removed."""
    import zstandard

    part = path.with_name(path.name + ".zst.part")
    with open(path, "rb") as src, open(part, "wb") as dst:
        zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
    part.replace(path.with_name(path.name + ".zst"))
    path.unlink()


@register("access-log")
class AccessLogFilter(Filter):
    """Lines are written at the end of the event-loop iteration that produced them:
    under load, one write for many requests instead of one each."""

    Config = AccessLogConfig
    completes_last = True
    config: AccessLogConfig

    _out: IO[str] | None = None
    _pending: list[str] | None = None

    _size = 0
    _compressing: threading.Thread | None = None

    async def start(self) -> None:
        self._pending = []
        if self.config.path == "-":
            self._out = sys.stdout
        else:
            Path(self.config.path).parent.mkdir(parents=True, exist_ok=True)
            self._open()

    def _open(self) -> None:
        self._out = open(self.config.path, "a")  # noqa: SIM115 - owned until close/reopen/rotation
        self._size = self._out.tell()

    def reopen(self) -> None:
        """Flush, close and reopen the file (after an external rotation; call it on SIGHUP)."""
        if self._out is None or self._out is sys.stdout:
            return
        self._flush()
        self._out.close()
        self._open()

    def _rotate(self) -> None:
        """path -> path.1 (compressed if asked), path.1 -> path.2, ...; the oldest is dropped."""
        assert self._out is not None
        self._out.close()
        self._wait_compression()
        suffix = ".zst" if self.config.compress == "zstd" else ""
        base = self.config.path
        for n in range(self.config.backups - 1, 0, -1):
            older = Path(f"{base}.{n}{suffix}")
            if older.exists():
                older.replace(f"{base}.{n + 1}{suffix}")
        Path(base).replace(f"{base}.1")
        self._open()
        if suffix:  # compressing takes a while: off the event loop
            self._compressing = threading.Thread(target=_compress, args=(Path(f"{base}.1"),),
                                                 name="access-log-zstd")
            self._compressing.start()

    def _wait_compression(self) -> None:
        if self._compressing is not None:
            self._compressing.join()
            self._compressing = None

    async def close(self) -> None:
        self._flush()
        if self._out is not None and self._out is not sys.stdout:
            self._out.close()
        self._out = None
        self._wait_compression()

    async def on_complete(self, ctx: RequestContext) -> None:
        if self._out is None or self._pending is None:
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(_encode(access_record(ctx, self.config.include_filter_timings)) + "\n")

    def _flush(self) -> None:
        if not self._pending or self._out is None:
            return
        lines, self._pending = "".join(self._pending), []
        try:
            limit = self.config.max_bytes
            if limit and self._size and self._size + len(lines) > limit:
                self._rotate()
            self._out.write(lines)
            self._out.flush()
            self._size += len(lines)
        except OSError:
            log.exception("access log %s: write failed", self.config.path)
