"""One exchange owns a proxied request's lifecycle, whatever answers it:

    admit (body, route, draining) -> on_request -> pick -> forward -> on_response
    -> relay -> on_complete

Every reply passes `on_response` and `on_complete` and so gets an access-log
line: the upstream's, a filter's local reply, and the replies the gateway makes
itself (404 no route, 413, 400 bad body, 503 draining or no healthy endpoint,
502/504 upstream failure, `/v1/models`). Replies made before the chain ran (no
route, draining, bad body) skip only `on_request`.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from functools import partial
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from filters.keys import matched_tokens, preferred_endpoint, prompt_block_keys, token_ids
from filters.runner import FilterChain
from gateway.admission import AdmissionGate
from gateway.endpoints import Cluster, Endpoint
from gateway.hygiene import TargetError, normalise_target
from gateway.model_list import list_models
from gateway.pickers.base import PREFILL_STARTED, Picker
from gateway.prefix_index import PrefixIndex
from gateway.proxy import ForwardPlan, Proxy
from gateway.routes import Route
from gateway.state import GatewayState
from gateway.usage import ask_for_usage
from kvkernel.context import CONTEXT_KEY, DecisionKind, RequestContext, RoutingDecision
from kvkernel.reply import LocalReply, ResponseHead, error_reply

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def request_id(request: web.BaseRequest) -> str:
    """The client's `x-request-id` if it is sane, else 32 random hex digits (an id, not a
    secret: the process-local PRNG, reseeded after fork, costs no system call)."""
    given = request.headers.get("x-request-id", "")
    return given if given and _REQUEST_ID.match(given) else f"{random.getrandbits(128):032x}"


def choose(cluster: Cluster, picker: Picker, ctx: RequestContext, tried: set[str]) -> Endpoint | None:
    """The endpoint for the next attempt (None when no eligible endpoint is left); records
    the typed decision. The pre-pick step honours the chain's preferred endpoint unless
    the picker weighs cache hints itself."""
    candidates = [e for e in cluster.endpoints if e.id not in tried and e.eligible()]
    if not candidates:
        return None
    attempt = len(tried) + 1
    if not tried and not picker.weighs_hints:
        wanted = preferred_endpoint(ctx)
        chosen = next((e for e in candidates if e.id == wanted), None) if wanted else None
        if chosen is not None:
            ctx.decision = RoutingDecision(DecisionKind.PREFERRED, picker.type_name, "preferred by the chain")
            return chosen
    choice = picker.pick(candidates, ctx)
    kind, reason = choice.kind, choice.reason
    if tried:
        kind, reason = DecisionKind.FAILOVER, reason or choice.kind.value
    ctx.decision = RoutingDecision(kind, picker.type_name, reason, attempt)
    return choice.endpoint


def predicted_uncached(ctx: RequestContext, endpoint: Endpoint) -> int:
    """Prompt tokens the endpoint is predicted to prefill (the hints' match subtracted)."""
    ids = token_ids(ctx)
    if ids is None:
        return 0
    return max(0, len(ids) - matched_tokens(ctx, endpoint.id))


def _nothing_uncached(endpoint: Endpoint) -> int:
    return 0  # no token ids: no predicted prefill


_FOLLOWS: dict[type[Picker], bool] = {}


def follows_attempts(picker: type[Picker]) -> bool:
    """Does this picker class act on an attempt's lifecycle (the base class's hooks do nothing)?"""
    found = _FOLLOWS.get(picker)
    if found is None:
        found = _FOLLOWS[picker] = any(getattr(picker, hook) is not getattr(Picker, hook)
                                       for hook in ("dispatched", "first_byte", "released"))
    return found


class AttemptAccounting:
    """Per attempt: tells the picker, and records the prefix as in flight at the endpoint
    in the prefix index until it settles (the next request sharing it sees a future hit)."""

    __slots__ = ("picker", "index", "ctx", "keys", "served")

    def __init__(self, picker: Picker, index: PrefixIndex, ctx: RequestContext) -> None:
        self.picker, self.index, self.ctx = picker, index, ctx
        self.keys: list[int] = []
        self.served = False

    def dispatched(self, endpoint: Endpoint) -> None:
        self.served = False
        self.keys = prompt_block_keys(self.ctx) or []
        self.index.expect(endpoint.id, self.keys)
        self.picker.dispatched(self.ctx, endpoint)

    def first_byte(self, endpoint: Endpoint) -> None:
        self.served = self.ctx.status is not None and 200 <= self.ctx.status < 300
        started = self.index.prefill_started(endpoint.id, self.keys)
        if started is not None:
            self.ctx[PREFILL_STARTED] = started
        self.picker.first_byte(self.ctx, endpoint)

    def released(self, endpoint: Endpoint) -> None:
        self.index.settle(endpoint.id, self.keys, served=self.served, learn=not endpoint.has_event_feed)
        self.picker.released(self.ctx, endpoint)


def _normalised(request: web.Request) -> tuple[web.Request, LocalReply | None]:
    """The request with its normalised target (`gateway.hygiene`), or a 400 reply."""
    try:
        target = normalise_target(request.raw_path)
    except TargetError as exc:
        # The connection is closed after it: the client and the gateway disagree on framing or paths.
        return request, error_reply(400, str(exc), code="invalid_request_target", headers={"Connection": "close"})
    if target != request.raw_path:
        request = request.clone(rel_url=URL(target, encoded=True))
    return request, None


class Exchange:
    def __init__(self, state: GatewayState, chain: FilterChain, proxy: Proxy,
                 gate: AdmissionGate | None = None) -> None:
        """`gate`: the gateway's admission gate, shared by every config generation."""
        self.state = state
        self.chain = chain
        self.proxy = proxy
        self.gate = gate if gate is not None else AdmissionGate(state.config.server.limits)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        state = self.state
        request, refused = _normalised(request)
        ctx = RequestContext(request_id(request), request.method, request.path if refused is None
                             else request.raw_path[:200], request.headers, remote=request.remote)
        request[CONTEXT_KEY] = ctx
        state.inflight += 1
        admitted = False
        try:
            admitted = refused is None and (self.gate.try_enter() or await self.gate.enter())
            if not admitted:
                refused = refused or self._overloaded()
                response: web.StreamResponse = await self._send(ctx, refused)
            else:
                response = await self._serve(request, ctx)
            if ctx.status is None:  # a relay that broke mid-way has recorded its failure status
                ctx.status = response.status
            return response
        except asyncio.CancelledError:
            ctx.error = ctx.error or "cancelled (client gone or shutdown)"
            raise
        finally:
            if admitted:
                self.gate.leave()
            state.inflight -= 1
            ctx.latency_ms = ctx.elapsed_ms()
            state.metrics.observe(ctx)
            await self.chain.on_complete(ctx)

    def _overloaded(self) -> LocalReply:
        limits = self.state.config.server.limits
        return error_reply(503, f"gateway overloaded: {limits.max_inflight} requests in flight and the wait "
                           f"queue full or its {limits.queue_timeout:g}s timeout passed", code="overloaded",
                           headers={"Retry-After": str(max(1, math.ceil(limits.queue_timeout)))})

    async def _serve(self, request: web.Request, ctx: RequestContext) -> web.StreamResponse:
        cluster, reply = await self._admit(request, ctx)
        if reply is None:
            reply = await self.chain.on_request(ctx)
        if reply is None:
            assert cluster is not None
            if _is_model_list(request):
                reply = await self._models(request)
            else:
                if ask_for_usage(ctx):
                    reserialise(ctx)
                outcome = await self.proxy.forward(request, ctx, self._plan(cluster, ctx))
                if isinstance(outcome, web.StreamResponse):
                    return outcome
                reply = outcome
        return await self._send(ctx, reply)

    def _plan(self, cluster: Cluster, ctx: RequestContext) -> ForwardPlan:
        picker = self.state.pickers[cluster.name]
        pick, on_head = partial(choose, cluster, picker, ctx), partial(self._on_head, ctx)
        if token_ids(ctx) is None and not follows_attempts(type(picker)):
            # Nothing to account: no prefix to book in the index, a picker that ignores attempts.
            return ForwardPlan(cluster, pick, on_head, _nothing_uncached)
        attempt = AttemptAccounting(picker, self.state.prefix_index, ctx)
        return ForwardPlan(cluster, pick, on_head, partial(predicted_uncached, ctx), attempt.dispatched,
                           attempt.first_byte, attempt.released)

    async def _on_head(self, ctx: RequestContext, head: ResponseHead) -> None:
        """`on_response`; a draining gateway also asks the client to close the connection,
        so no request is sent on a connection the shutdown is about to close."""
        await self.chain.on_response(ctx, head)
        if self.state.draining:
            head.headers["Connection"] = "close"

    async def _admit(self, request: web.Request, ctx: RequestContext) -> tuple[Cluster | None, LocalReply | None]:
        """Body, route and draining checks: the cluster, or the gateway's own reply. The route
        is matched once the body is parsed (it may match on the body's `model`)."""
        state = self.state
        reply = await self._read_body(request, ctx)
        if reply is not None:
            return None, reply
        if ctx.json is not None:
            model = ctx.json.get("model")
            ctx.model = model if isinstance(model, str) else None
            ctx.stream = ctx.json.get("stream") is True
        route = self._route(request, ctx)
        if route is None:
            return None, self._no_route(request, ctx)
        ctx.route, ctx.cluster = route.label, route.cluster
        cluster = state.clusters[route.cluster]
        if state.draining:
            return cluster, error_reply(503, "gateway is shutting down", code="draining",
                                        headers={"Retry-After": "1", "Connection": "close"})
        if route.rewrite_model is not None and ctx.json is not None and ctx.model is not None \
                and ctx.model != route.rewrite_model:
            ctx.json["model"] = route.rewrite_model
            ctx.log_fields["upstream_model"] = route.rewrite_model
            reserialise(ctx)
        return cluster, None

    def _route(self, request: web.Request, ctx: RequestContext) -> Route | None:
        routes = self.state.routes
        if _is_model_list(request):  # speaks for every route at this path, whatever their models
            listing = routes.listing(request.path, request.headers)
            return listing[0] if listing else None
        return routes.match(request.path, request.headers, ctx.model)

    def _no_route(self, request: web.Request, ctx: RequestContext) -> LocalReply:
        routes = self.state.routes
        if routes.uses_models and routes.listing(request.path, request.headers):
            if ctx.model is not None:
                return error_reply(404, f"The model '{ctx.model}' does not exist or is not served here",
                                   code="model_not_found", param="model")
            return error_reply(404, f"no route for path {request.path!r} without a 'model' in the body",
                               code="route_not_found", param="model")
        return error_reply(404, f"no route for path {request.path!r}", code="route_not_found")

    async def _read_body(self, request: web.Request, ctx: RequestContext) -> LocalReply | None:
        """Read and JSON-parse the body; a 400/413 reply if it is unacceptable."""
        limit = self.state.config.server.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return error_reply(413, f"request body of {request.content_length} bytes exceeds the limit of {limit}",
                               code="body_too_large")
        if not request.body_exists:
            return None
        try:
            if request.content.is_eof():  # it all came with the head: reading waits on nothing
                ctx.body = await request.read()
            else:
                async with asyncio.timeout(self.state.config.server.limits.body_timeout):
                    ctx.body = await request.read()
        except TimeoutError:
            return error_reply(408, "request body not received in time", code="body_timeout",
                               headers={"Connection": "close"})
        except web.HTTPRequestEntityTooLarge:
            return error_reply(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
        except web.RequestPayloadError as exc:  # e.g. a Content-Encoding that does not decode
            return error_reply(400, f"request body could not be read: {exc}", code="invalid_body")
        if request.method not in _BODY_METHODS or not ctx.body:
            return None
        # JSON when declared, or when no Content-Type was sent at all (curl -d, some SDKs);
        # any other declared type (octet-stream, form, text) is forwarded untouched.
        ctype = request.content_type
        if "Content-Type" in request.headers and ctype != "application/json" and not ctype.endswith("+json"):
            return None
        return self._parse_json(ctx)

    @staticmethod
    def _parse_json(ctx: RequestContext) -> LocalReply | None:
        try:
            parsed: Any = json.loads(ctx.body)
        except (ValueError, UnicodeDecodeError) as exc:
            return error_reply(400, f"request body is not valid JSON: {exc}", code="invalid_json")
        except RecursionError:
            return error_reply(400, "request body is nested too deeply", code="invalid_json")
        if not isinstance(parsed, dict):
            return error_reply(400, f"request body must be a JSON object, got {type(parsed).__name__}",
                               code="invalid_json")
        ctx.json = parsed
        return None

    async def _send(self, ctx: RequestContext, reply: LocalReply) -> web.Response:
        """A local reply, after `on_response` (filters may add headers or change nothing else)."""
        headers: CIMultiDict[str] = CIMultiDict(reply.headers)
        headers["x-request-id"] = ctx.request_id
        head = ResponseHead(reply.status, headers, local=True)
        await self.chain.on_response(ctx, head)
        ctx.status = head.status
        if reply.error is not None:
            ctx.error = ctx.error or reply.error[:200]
        if ctx.decision is None:
            ctx.decision = RoutingDecision(DecisionKind.LOCAL_REPLY, reason=reply.error or "gateway reply")
        body = _encode(reply.body).encode()
        ctx.bytes_out = len(body)
        response = web.Response(status=head.status, body=body, headers=head.headers)
        response.content_type = "application/json"
        if self.state.draining or head.headers.get("Connection", "").lower() == "close":
            response.force_close()  # the header alone leaves aiohttp's side of the connection open
        return response

    async def _models(self, request: web.Request) -> LocalReply:
        """`GET /v1/models`: what every route at this path serves (see `gateway.model_list`)."""
        state = self.state
        assert state.http is not None
        routes = state.routes.listing(request.path, request.headers)
        return await list_models(state.http, routes, state.clusters)


def _is_model_list(request: web.Request) -> bool:
    return request.method == "GET" and request.path.endswith("/v1/models")


def reserialise(ctx: RequestContext) -> None:
    """The body the upstream gets, from `ctx.json` (only when the gateway changed it)."""
    assert ctx.json is not None
    ctx.body = _encode(ctx.json).encode()
