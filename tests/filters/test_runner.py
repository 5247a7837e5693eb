from __future__ import annotations

from typing import Any

import httpx

from filters.base import CONTINUE, Filter, FilterResult, ResponseHead, Services, stop
from filters.runner import FilterChain
from gateway.background import BackgroundQueue
from gateway.endpoints import ClusterRegistry
from kvkernel.context import RequestContext


class Recorder(Filter):
    def __init__(self, name: str, calls: list[str], action: str = "continue") -> None:
        services = Services(ClusterRegistry([]), BackgroundQueue(), httpx.AsyncClient())
        super().__init__(None, name, services)
        self.calls, self.action = calls, action

    async def on_request(self, ctx: RequestContext) -> FilterResult:
        self.calls.append(f"req:{self.name}")
        if self.action == "raise":
            raise RuntimeError("boom")
        if self.action == "stop":
            return stop(429, "slow down", code="rate_limited")
        return CONTINUE

    async def on_response(self, ctx: RequestContext, head: ResponseHead) -> None:
        self.calls.append(f"resp:{self.name}")
        head.headers[f"x-{self.name}"] = "1"

    async def on_complete(self, ctx: RequestContext) -> None:
        self.calls.append(f"done:{self.name}")
        if self.action == "raise-complete":
            raise RuntimeError("late boom")


def _ctx() -> RequestContext:
    return RequestContext("r1", "POST", "/v1/completions")


async def test_config_order_in_reverse_order_out() -> None:
    calls: list[str] = []
    chain = FilterChain([Recorder("a", calls), Recorder("b", calls)])
    ctx = _ctx()
    assert await chain.on_request(ctx) is None
    head = ResponseHead(200, {})
    await chain.on_response(ctx, head)
    await chain.on_complete(ctx)
    assert calls == ["req:a", "req:b", "resp:b", "resp:a", "done:b", "done:a"]
    assert head.headers == {"x-a": "1", "x-b": "1"} and set(ctx.filter_ms) == {"a", "b"}


async def test_stop_skips_later_filters_with_a_local_reply() -> None:
    calls: list[str] = []
    chain = FilterChain([Recorder("a", calls, "stop"), Recorder("b", calls)])
    ctx = _ctx()
    reply = await chain.on_request(ctx)
    assert reply is not None and reply.status == 429 and reply.body["error"]["code"] == "rate_limited"
    assert calls == ["req:a"] and ctx.decision is not None and ctx.decision.reason == "stopped by a"


async def test_exception_becomes_500_naming_the_filter_and_complete_still_runs() -> None:
    calls: list[str] = []
    chain = FilterChain([Recorder("a", calls), Recorder("bad", calls, "raise"), Recorder("c", calls,
                                                                                        "raise-complete")])
    ctx = _ctx()
    reply = await chain.on_request(ctx)
    assert reply is not None and reply.status == 500
    error: dict[str, Any] = reply.body["error"]
    assert "'bad'" in error["message"] and error["code"] == "filter_error"
    await chain.on_complete(ctx)  # c raises in on_complete: logged, never fatal
    assert calls[-3:] == ["done:c", "done:bad", "done:a"]


class Logger(Recorder):
    completes_last = True


async def test_loggers_complete_after_every_other_filter() -> None:
    calls: list[str] = []
    chain = FilterChain([Recorder("a", calls), Logger("log", calls), Recorder("c", calls)])
    await chain.on_complete(_ctx())
    assert calls == ["done:c", "done:a", "done:log"]


async def test_access_log_sees_fields_set_in_other_filters_on_complete(tmp_path: Any) -> None:
    import json

    from filters.access_log import AccessLogConfig, AccessLogFilter

    class Tagger(Recorder):
        async def on_complete(self, ctx: RequestContext) -> None:
            ctx.log_fields["tagged_by"] = self.name

    services = Services(ClusterRegistry([]), BackgroundQueue(), httpx.AsyncClient())
    access = AccessLogFilter(AccessLogConfig(path=str(tmp_path / "a.jsonl")), "access-log", services)
    chain = FilterChain([Tagger("before", []), access, Tagger("after", [])])
    await chain.start()
    await chain.on_complete(_ctx())
    await chain.close()
    (line,) = (tmp_path / "a.jsonl").read_text().splitlines()
    assert json.loads(line)["tagged_by"] == "before"  # the last tagger to run before the log
