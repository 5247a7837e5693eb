"""`access-log` filter: one JSON line per request, written in `on_complete`.

Prompts are never logged; only `prompt_hash` (a digest of model + prompt). The
routing fields other filters and the proxy add (tier, preferred and chosen
endpoint, predicted vs actual cached tokens, candidate scores) are included.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from filters.base import Filter
from filters.keys import CACHE_HINTS, PROMPT, TOKENS, CacheHints, preferred_endpoint
from filters.registry import register
from kvkernel.context import RequestContext
from kvkernel.decode import FieldError

log = logging.getLogger("kvgate.access_log")
_NO_HINTS = CacheHints()


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    path: str = "-"  # "-" = stdout
    include_filter_timings: bool = False

    def __post_init__(self) -> None:
        if not self.path:
            raise FieldError("path", "must be a file path or '-' for stdout")


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


@register("access-log")
class AccessLogFilter(Filter):
    """Lines are written at the end of the event-loop iteration that produced them:
    under load, one write for many requests instead of one each."""

    Config = AccessLogConfig
    completes_last = True
    config: AccessLogConfig

    _out: IO[str] | None = None
    _pending: list[str] | None = None

    async def start(self) -> None:
        self._pending = []
        if self.config.path == "-":
            self._out = sys.stdout
        else:
            path = Path(self.config.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._out = open(path, "a")  # noqa: SIM115, ASYNC230 - once, at startup

    async def close(self) -> None:
        self._flush()
        if self._out is not None and self._out is not sys.stdout:
            self._out.close()
        self._out = None

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
            self._out.write(lines)
            self._out.flush()
        except OSError:
            log.exception("access log %s: write failed", self.config.path)
