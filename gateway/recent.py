"""Recent request summaries for the live `/dashboard`: a fixed-size ring, fed once per request.

Each entry is a small tuple of what the request already holds (no dict, no formatting
per request on the hot path: the decision, cache hints and usage objects are kept as
they are); `records()` turns them into access-log-shaped dicts (same field names) when
the dashboard is drawn.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from filters.keys import CACHE_HINTS, PROMPT, CacheHints
from kvkernel.context import RequestContext, RoutingDecision, Usage


class RecentRequests:
    def __init__(self, size: int = 4096) -> None:
        self._ring: deque[tuple[Any, ...]] = deque(maxlen=size)
        self.total = 0

    def add(self, ctx: RequestContext) -> None:
        prompt = ctx.get(PROMPT)  # its model and digest only: the prompt's text is not kept
        self._ring.append((ctx.received_at, ctx.route, ctx.endpoint, prompt.model if prompt else None,
                           prompt.digest if prompt else None, ctx.status, ctx.latency_ms, ctx.ttfb_ms,
                           ctx.attempts, ctx.error, ctx.decision, ctx.get(CACHE_HINTS), ctx.usage))
        self.total += 1

    def __len__(self) -> int:
        return len(self._ring)

    def records(self) -> Iterator[dict[str, Any]]:
        """The ring's entries, oldest first, with the access log's field names (`time` as epoch seconds)."""
        for entry in list(self._ring):
            yield _record(*entry)


def _record(epoch: float, route: str | None, endpoint: str | None, model: str | None, digest: str | None,
            status: int | None, latency_ms: float | None, ttfb_ms: float | None, attempts: int, error: str | None,
            decision: RoutingDecision | None, hints: CacheHints | None, usage: Usage) -> dict[str, Any]:
    return {
        "time": epoch, "route": route, "endpoint": endpoint, "model": model, "prompt_hash": digest,
        "status": status, "latency_ms": latency_ms, "ttfb_ms": ttfb_ms, "retries": max(0, attempts - 1),
        "error": error, "decision": decision.render() if decision else None,
        "tier": hints.tier if hints else None,
        "predicted_cached_tokens": hints.matched_tokens.get(endpoint, 0) if hints and endpoint else None,
        "prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.cached_tokens,
        "completion_tokens": usage.completion_tokens,
    }
