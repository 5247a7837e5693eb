"""Runs the chain: config order in, reverse order out, `on_complete` always
(loggers that set `completes_last` complete after everyone else).

Times every hook into `ctx.filter_ms`, and turns a filter's exception into a
500 local reply that names the filter (the gateway keeps serving).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from filters.base import Action, Filter, FilterResult, LocalReply, ResponseHead, stop
from kvkernel.context import DecisionKind, RequestContext, RoutingDecision

log = logging.getLogger("kvgate.filters")


def _overrides(f: Filter, hook: str) -> bool:
    """Does `f` do anything in `hook` (its class or the instance replaced the base's no-op)?"""
    return getattr(getattr(f, hook), "__func__", None) is not getattr(Filter, hook)


class FilterChain:
    def __init__(self, filters: Sequence[Filter]) -> None:
        self.filters = list(filters)
        self._reversed = list(reversed(self.filters))
        # Per request, only the filters that override a response-side hook are called
        # for it: the base class's hooks do nothing.
        self._responders = [f for f in self._reversed if _overrides(f, "on_response")]
        completers = [f for f in self._reversed if _overrides(f, "on_complete")]
        self._completers = ([f for f in completers if not f.completes_last]
                            + [f for f in completers if f.completes_last])

    async def start(self) -> None:
        for f in self.filters:
            await f.start()

    async def close(self) -> None:
        for f in self._reversed:
            try:
                await f.close()
            except Exception:
                log.exception("filter %s failed to close", f.name)

    async def on_request(self, ctx: RequestContext) -> LocalReply | None:
        """Run `on_request` hooks in order; the first STOP's local reply, or None to proceed."""
        for f in self.filters:
            t0 = time.perf_counter()
            try:
                result: FilterResult = await f.on_request(ctx)
            except Exception as exc:
                log.exception("filter %s raised in on_request (request %s)", f.name, ctx.request_id)
                ctx.error = f"filter {f.name}: {type(exc).__name__}"
                result = stop(500, f"internal error in filter '{f.name}' ({type(exc).__name__})",
                              code="filter_error")
            finally:
                ctx.filter_ms[f.name] = ctx.filter_ms.get(f.name, 0.0) + (time.perf_counter() - t0) * 1000
            if result.action is Action.STOP:
                ctx.decision = ctx.decision or RoutingDecision(DecisionKind.LOCAL_REPLY, reason=f"stopped by {f.name}")
                return result.reply
        return None

    async def on_response(self, ctx: RequestContext, head: ResponseHead) -> None:
        """Run `on_response` hooks in reverse order; an exception is logged, never fatal."""
        for f in self._responders:
            try:
                await f.on_response(ctx, head)
            except Exception:
                log.exception("filter %s raised in on_response (request %s)", f.name, ctx.request_id)

    async def on_complete(self, ctx: RequestContext) -> None:
        """Run every `on_complete` hook in reverse order, whatever happened before."""
        for f in self._completers:
            try:
                await f.on_complete(ctx)
            except Exception:
                log.exception("filter %s raised in on_complete (request %s)", f.name, ctx.request_id)
