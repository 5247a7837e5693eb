"""The proxy step: the terminal step of an exchange. It asks for an endpoint, forwards,
and streams the answer back unbuffered. It knows nothing of the filter chain: the
exchange hands it a `ForwardPlan` (how to choose the next endpoint, what to call
with the response head before a byte is sent, the predicted prefill per endpoint).

Retries and fail-over happen only before the first byte reached the client (see
`gateway.attempts` for what each failure means: retried or not, breaker or not,
outlier detection). A 4xx is never a backend failure; 429/503 are backpressure.
After the head was sent nothing is retried: a broken stream ends with an SSE
error event and the request is recorded as failed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.attempts import (
    BREAKER_STATUSES,
    Verdict,
    charge,
    judge,
    no_endpoint_reply,
    sse_error_event,
    verdict_of_error,
    verdict_of_status,
)
from gateway.endpoints import Cluster, Endpoint
from gateway.outlier import Outcome, outcome_of_status
from gateway.upstream_auth import apply_upstream_auth
from gateway.usage import UsageChunkStripper, stripper_for
from kvkernel.context import RequestContext
from kvkernel.reply import LocalReply, ResponseHead, error_reply

log = logging.getLogger("kvgate.proxy")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
})
# Request bodies in these encodings were already decoded by aiohttp's server parser.
DECODED_ENCODINGS = frozenset({"gzip", "deflate", "br", "zstd"})
_TAIL_BYTES = 16384
_USAGE_RE = re.compile(rb'"usage"\s*:\s*\{')
_INT_FIELD = {name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*(\d+)')
              for name in ("prompt_tokens", "completion_tokens", "cached_tokens")}


@functools.lru_cache(maxsize=256)
def _dropped_headers(connection: str | None) -> frozenset[str]:
    """Hop-by-hop header names plus those a `Connection` header value names (lower case)."""
    if not connection:
        return HOP_BY_HOP
    return HOP_BY_HOP | {h.strip().lower() for h in connection.split(",") if h.strip()}


def _end_to_end(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """A copy of `headers` without hop-by-hop ones; order and repeats of the rest kept."""
    out: CIMultiDict[str] = CIMultiDict(headers)
    for name in _dropped_headers(headers.get("Connection")):
        if name in out:
            del out[name]
    return out


# A body buffered whole and at most this long is relayed without a deadline: writing it
# cannot wait on the client (aiohttp's and the transport's write buffers hold 64 KiB).
_UNBLOCKED_BYTES = 65536


@functools.lru_cache(maxsize=64)
def client_timeout(connect: float) -> aiohttp.ClientTimeout:
    """aiohttp's part of the upstream timeouts: connect only (immutable, so shared). The
    head and body deadlines are the proxy's own (`asyncio.timeout_at`, `IdleWatch`)."""
    return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=None)


def is_streamed(ctx: RequestContext) -> bool:
    """Did the client ask for a stream (`"stream": true`)?"""
    return ctx.stream or (ctx.json is not None and ctx.json.get("stream") is True)


def forward_headers(request: web.BaseRequest, request_id: str) -> CIMultiDict[str]:
    """Request headers for the upstream: hop-by-hop ones (and those named in Connection)
    dropped, `x-request-id` set, the client appended to `x-forwarded-for`."""
    headers = request.headers
    out = _end_to_end(headers)
    if headers.get("Content-Encoding", "").strip().lower() in DECODED_ENCODINGS:
        out.popall("Content-Encoding", None)  # we forward the decoded body
    out["x-request-id"] = request_id
    if request.remote:
        prior = headers.get("x-forwarded-for")
        out["x-forwarded-for"] = f"{prior}, {request.remote}" if prior else request.remote
    return out


def response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    return _end_to_end(upstream.headers)


def parse_usage(tail: bytes, ctx: RequestContext) -> None:
    """Fill `ctx.usage` from the last `"usage": {...}` object in the response tail."""
    start = tail.rfind(b'"usage"')
    if start < 0:
        return
    found = _USAGE_RE.match(tail, start)  # the last occurrence is, nearly always, the last match
    if found is None:
        matches = list(_USAGE_RE.finditer(tail))
        if not matches:
            return
        found = matches[-1]
    end = found.end()
    for name, pattern in _INT_FIELD.items():
        field = pattern.search(tail, end)
        if field:
            setattr(ctx.usage, name, int(field.group(1)))


class PrefillBacklog:
    """Predicted uncached prompt tokens charged to an endpoint until its first byte."""

    __slots__ = ("endpoint", "tokens")

    def __init__(self, endpoint: Endpoint, tokens: int) -> None:
        self.endpoint, self.tokens = endpoint, tokens
        endpoint.prefill_backlog += tokens

    def release(self) -> None:
        if self.tokens:
            self.endpoint.prefill_backlog -= self.tokens
            self.tokens = 0


class IdleWatch:
    """A stream's idle timeout with one timer, not one per chunk: `touch()` on each chunk
    only notes the time; the timer, armed for the last chunk's time + `idle`, re-arms
    itself when a chunk came meanwhile, and otherwise expires `budget` (an entered
    `asyncio.timeout(None)`, which then raises TimeoutError at its exit). Only waiting
    for the upstream counts: between `writing()` and the next `touch()` (a write to a
    slow client) the stream is not idle."""

    __slots__ = ("_loop", "_budget", "_idle", "_last", "_handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, budget: asyncio.Timeout, idle: float) -> None:
        self._loop, self._budget, self._idle = loop, budget, idle
        self._last = loop.time()
        self._handle: asyncio.TimerHandle | None = loop.call_at(self._last + idle, self._check)

    def touch(self) -> None:
        self._last = self._loop.time()

    def writing(self) -> None:
        self._last = math.inf

    def _check(self) -> None:
        due, now = self._last + self._idle, self._loop.time()
        if now < due:  # a chunk came (or a write is under way: look again in `idle`)
            self._handle = self._loop.call_at(min(due, now + self._idle), self._check)
            return
        self._handle = None
        self._budget.reschedule(now)  # due now: cancels the relay, TimeoutError at the budget's exit

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class _CoalescedHeadResponse(web.StreamResponse):
    """A relayed response whose head goes out with the first body bytes, in one write (as
    aiohttp's own `web.Response` does), not alone at `prepare()`. Used when that costs the
    client nothing: the body has a known length, or its first bytes are already here."""

    _send_headers_immediately = False


class UpstreamFailure(Exception):
    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.message)
        self.verdict = verdict


@dataclass(slots=True)  # one per request: not frozen, so it is built without object.__setattr__
class ForwardPlan:
    """What the exchange gives the proxy for one request."""

    cluster: Cluster
    choose: Callable[[set[str]], Endpoint | None]  # next endpoint, given the ids tried so far
    on_head: Callable[[ResponseHead], Awaitable[None]]  # before the head is sent (filters may edit it)
    uncached: Callable[[Endpoint], int]  # predicted uncached prompt tokens there
    # Attempt lifecycle, for load and cache accounting: sent, first body byte, over.
    on_dispatch: Callable[[Endpoint], None] = lambda endpoint: None
    on_first_byte: Callable[[Endpoint], None] = lambda endpoint: None
    on_release: Callable[[Endpoint], None] = lambda endpoint: None


class Proxy:
    def __init__(self, session: aiohttp.ClientSession, debug_headers: bool = False) -> None:
        self.session = session
        self.debug_headers = debug_headers

    async def forward(self, request: web.Request, ctx: RequestContext,
                      plan: ForwardPlan) -> web.StreamResponse | LocalReply:
        """The relayed response, or a local error reply when no attempt got through."""
        cluster = plan.cluster
        tried: set[str] = set()
        last: Verdict | None = None
        attempts = cluster.config.retry.max_attempts
        stale: Endpoint | None = None
        streamed = is_streamed(ctx)
        while ctx.attempts < attempts:
            endpoint = plan.choose(tried)
            if endpoint is None and stale is not None and stale.eligible():
                endpoint, stale = stale, None  # no other endpoint left: retry it on a fresh connection
            if endpoint is None or not endpoint.breaker.allow():
                break
            tried.add(endpoint.id)
            ctx.attempts += 1
            ctx.endpoint = endpoint.id
            try:
                return await self._attempt(request, ctx, plan, endpoint, ctx.attempts >= attempts, streamed)
            except UpstreamFailure as failure:
                last = failure.verdict
                if last.stale and ctx.attempts == 1:
                    stale = endpoint
                if not last.retry:
                    break
        return no_endpoint_reply(cluster) if last is None else error_reply(last.status, last.message, code=last.code)

    async def _attempt(self, request: web.Request, ctx: RequestContext, plan: ForwardPlan,
                       endpoint: Endpoint, final: bool, streamed: bool) -> web.StreamResponse:
        timeouts = plan.cluster.config.timeouts
        loop = asyncio.get_running_loop()
        # A non-streamed answer comes only after the whole generation: `total` bounds it,
        # head and body. A stream's head is bounded by `first_byte`, each later chunk by `idle`.
        deadline = loop.time() + (timeouts.first_byte if streamed else timeouts.total)
        backlog = PrefillBacklog(endpoint, plan.uncached(endpoint))
        endpoint.inflight += 1
        endpoint.stats.requests += 1
        plan.on_dispatch(endpoint)
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    upstream = await self.session.request(
                        request.method, URL(endpoint.url + request.raw_path, encoded=True), data=ctx.body or None,
                        headers=apply_upstream_auth(forward_headers(request, ctx.request_id), plan.cluster.config),
                        timeout=client_timeout(timeouts.connect), allow_redirects=False,
                    )
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise self._failed(ctx, plan, endpoint, verdict_of_error(exc, endpoint.id, request.method)) from None
            async with upstream:
                verdict = verdict_of_status(upstream.status, endpoint.id)
                if verdict is not None and not final:
                    raise self._failed(ctx, plan, endpoint, verdict)
                if upstream.status in BREAKER_STATUSES:
                    charge(endpoint, counts=True)
                judge(ctx, plan.cluster, endpoint, outcome_of_status(upstream.status))
                return await self._relay(request, ctx, plan, endpoint, upstream, backlog,
                                         timeouts.idle if streamed else None, deadline)
        except UpstreamFailure:
            raise
        except BaseException:  # client gone (cancelled, reset before the head): no verdict on the endpoint
            endpoint.breaker.release()  # frees its half-open slot, if it held one
            raise
        finally:
            endpoint.inflight -= 1
            backlog.release()
            plan.on_release(endpoint)

    @staticmethod
    def _failed(ctx: RequestContext, plan: ForwardPlan, endpoint: Endpoint, verdict: Verdict) -> UpstreamFailure:
        """Account a failed attempt (stats, breaker, outlier detection)."""
        charge(endpoint, counts=verdict.breaker)
        judge(ctx, plan.cluster, endpoint, verdict.outcome)
        return UpstreamFailure(verdict)

    async def _relay(self, request: web.Request, ctx: RequestContext, plan: ForwardPlan, endpoint: Endpoint,
                     upstream: aiohttp.ClientResponse, backlog: PrefillBacklog, idle: float | None,
                     deadline: float) -> web.StreamResponse:
        """Send the head, then the body as it arrives. A stream (`idle` given) ends once
        `idle` seconds pass without a chunk; any other body must be in by `deadline`."""
        headers = response_headers(upstream)
        headers["x-request-id"] = ctx.request_id
        if self.debug_headers:
            headers["x-kvgate-endpoint"] = endpoint.id
        head = ResponseHead(upstream.status, headers)
        await plan.on_head(head)
        # A stream whose first bytes have not arrived yet (e.g. a long prefill) gets its head now.
        coalesce = upstream.content_length is not None or upstream.content.total_bytes > 0
        response_class = _CoalescedHeadResponse if coalesce else web.StreamResponse
        response = response_class(status=upstream.status, reason=upstream.reason, headers=head.headers)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        if head.headers.get("Connection", "").lower() == "close":  # set by the exchange when draining
            response.force_close()
        ctx.status = upstream.status
        await response.prepare(request)
        tail = b""
        # Set when the gateway asked for usage the client did not: drops the extra chunk.
        strip = stripper_for(ctx, upstream.status, upstream.content_type, upstream.content_length)
        content = upstream.content
        try:
            if idle is not None:
                async with asyncio.timeout(None) as budget:
                    watch = IdleWatch(asyncio.get_running_loop(), budget, idle)
                    try:
                        tail = await self._relay_chunks(ctx, plan, endpoint, upstream, response, backlog, strip, watch)
                    finally:
                        watch.cancel()
            elif content.is_eof() and content.total_bytes <= _UNBLOCKED_BYTES:
                # The whole (small) body is here: relaying it waits on nothing, needs no timer.
                tail = await self._relay_chunks(ctx, plan, endpoint, upstream, response, backlog, strip, None)
            else:
                async with asyncio.timeout_at(deadline):  # one deadline for the whole body (`total`)
                    tail = await self._relay_chunks(ctx, plan, endpoint, upstream, response, backlog, strip, None)
            if strip is not None and (rest := strip.flush()):
                await response.write(rest)
                ctx.bytes_out += len(rest)
            await response.write_eof()
            if upstream.status not in BREAKER_STATUSES:
                endpoint.breaker.record_success()  # only a whole body proves the endpoint sound
        except (ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
            endpoint.breaker.release()
            ctx.error = f"client disconnected: {type(exc).__name__}"
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            await self._broken(request, ctx, plan, endpoint, upstream, response, exc)
        parse_usage(tail, ctx)
        return response

    @staticmethod
    async def _relay_chunks(ctx: RequestContext, plan: ForwardPlan, endpoint: Endpoint,
                            upstream: aiohttp.ClientResponse, response: web.StreamResponse, backlog: PrefillBacklog,
                            strip: UsageChunkStripper | None, watch: IdleWatch | None) -> bytes:
        """Body chunks as they arrive, each noted by the stream's `watch` (if any). Returns
        the body's last `_TAIL_BYTES` (for its `usage`)."""
        # The tail's chunks, joined and cut only once they hold twice what is kept: a long
        # stream's bytes are copied about twice, not `_TAIL_BYTES` per chunk.
        tail: list[bytes] = []
        kept = 0
        content = upstream.content
        while True:
            chunk = await content.readany()
            if watch is not None:
                watch.touch()
            if not chunk:
                return b"".join(tail)[-_TAIL_BYTES:]
            if ctx.ttfb_ms is None:
                ctx.ttfb_ms = ctx.elapsed_ms()
                backlog.release()  # the first byte means prefill is done
                plan.on_first_byte(endpoint)
            tail.append(chunk)
            kept += len(chunk)
            if kept > 2 * _TAIL_BYTES:
                tail = [b"".join(tail)[-_TAIL_BYTES:]]
                kept = _TAIL_BYTES
            if strip is not None and not (chunk := strip.feed(chunk)):
                continue  # an incomplete event, or the dropped usage chunk
            if watch is None:
                await response.write(chunk)
            else:  # the idle clock measures the upstream's silence, not the client's reading
                watch.writing()
                await response.write(chunk)
                watch.touch()
            ctx.bytes_out += len(chunk)

    async def _broken(self, request: web.Request, ctx: RequestContext, plan: ForwardPlan, endpoint: Endpoint,
                      upstream: aiohttp.ClientResponse, response: web.StreamResponse, exc: BaseException) -> None:
        """The upstream broke (or went silent) after the head was sent: no retry is possible.
        A stream ends with an OpenAI-shaped SSE error event; any other body is cut short.
        Recorded as failed: 504 for a timeout, 502 otherwise."""
        timed_out = isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ClientConnectionError)
        ctx.status = 504 if timed_out else 502
        what = "went silent" if timed_out else "broke"
        ctx.error = f"upstream {endpoint.id} {what} mid-response: {type(exc).__name__}"
        if timed_out:  # slow is not broken: the breaker and outlier detection do not count it
            endpoint.breaker.release()
        else:
            charge(endpoint, counts=True)
            judge(ctx, plan.cluster, endpoint, Outcome.GATEWAY_FAILURE)
        if upstream.content_type == "text/event-stream":
            try:
                await response.write(sse_error_event(ctx.status, ctx.error, timed_out))
                await response.write_eof()
                return
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                pass
        if request.transport is not None:
            request.transport.close()
