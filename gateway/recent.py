"""Recent request summaries for the live `/dashboard`: a fixed-size ring, fed once per request.

Each entry is a small tuple (no dict per request on the hot path); `records()` turns
them into access-log-shaped dicts (same field names) when the dashboard is drawn.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from filters.keys import CACHE_HINTS, PROMPT
from kvkernel.context import RequestContext

FIELDS = ("epoch", "route", "endpoint", "model", "prompt_hash", "status", "latency_ms", "ttfb_ms", "retries",
          "error", "decision", "tier", "predicted_cached_tokens", "prompt_tokens", "cached_tokens",
          "completion_tokens")


class RecentRequests:
    def __init__(self, size: int = 4096) -> None:
        self._ring: deque[tuple[Any, ...]] = deque(maxlen=size)
        self.total = 0

    def add(self, ctx: RequestContext) -> None:
        prompt, hints = ctx.get(PROMPT), ctx.get(CACHE_HINTS)
        predicted = hints.matched_tokens.get(ctx.endpoint, 0) if hints and ctx.endpoint else None
        usage = ctx.usage
        self._ring.append((ctx.received_at, ctx.route, ctx.endpoint, prompt.model if prompt else None,
                           prompt.digest if prompt else None, ctx.status, ctx.latency_ms, ctx.ttfb_ms,
                           ctx.retries, ctx.error, ctx.decision.render() if ctx.decision else None,
                           hints.tier if hints else None, predicted, usage.prompt_tokens, usage.cached_tokens,
                           usage.completion_tokens))
        self.total += 1

    def __len__(self) -> int:
        return len(self._ring)

    def records(self) -> Iterator[dict[str, Any]]:
        """The ring's entries, oldest first, with the access log's field names (`time` as epoch seconds)."""
        for entry in list(self._ring):
            record = dict(zip(FIELDS, entry, strict=True))
            record["time"] = record.pop("epoch")
            yield record
