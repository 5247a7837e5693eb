"""HTTP handlers of the MLX daemon. Only the app factory (mlxd.server) wires them.

Generation handlers tokenize off the event loop, hand a `GenRequest` to the engine
thread and relay its events; the engine's sink hops back with
`call_soon_threadsafe`. Whenever a handler ends early (client gone, handler
cancelled, write failed) its `finally` cancels the request in the engine, which
frees the batch slot.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from kvtok.chat_tokens import ChatTokenizer, PromptError, chat_ids, completion_ids
from mlxd.engine import Engine
from mlxd.engine_types import EngineClosed, Event, GenRequest, QueueFull
from mlxd.metrics import DaemonMetrics
from mlxd.model_info import ModelInfo
from mlxd.openai_api import (
    BadRequest,
    ResponseShaper,
    error_body,
    gen_params,
    wants_usage_in_stream,
)

DEFAULT_RETRY_S = 1
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Daemon:
    """The app singletons: engine, tokenizer, model facts, metrics, LMCache reporter."""

    engine: Engine
    tokenizer: ChatTokenizer
    info: ModelInfo
    metrics: DaemonMetrics
    instance_id: str
    reporter: Any = None
    retry_after_s: int = DEFAULT_RETRY_S


DAEMON = web.AppKey("daemon", Daemon)


def json_error(status: int, message: str, code: str | None = None,
               param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(message, status, param, code), status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Client errors -> 400 (or their own status) in the OpenAI shape; bugs -> 500, still JSON."""
    try:
        return await handler(request)
    except BadRequest as exc:
        return json_error(exc.status, str(exc), exc.code, exc.param)
    except PromptError as exc:
        return json_error(400, str(exc), "invalid_prompt")
    except EngineClosed as exc:
        return json_error(503, str(exc), "engine_closed", headers={"Retry-After": str(DEFAULT_RETRY_S)})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, exc.reason)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # noqa: BLE001 - every request ends with a JSON answer
        request.app.logger.exception("unhandled error in %s", request.path)
        return json_error(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # json.loads gives up on deeply nested arrays/objects
        raise BadRequest("request body is not valid JSON: nested too deeply") from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _check_model(d: Daemon, body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {type(model).__name__}", "model")
    if model is not None and model not in {d.info.name, str(d.info.path), d.instance_id}:
        raise BadRequest(f"The model `{model}` does not exist.", "model", 404, "model_not_found")


# ---- generation ------------------------------------------------------------------------


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    d = request.app[DAEMON]
    body = await _json_body(request)
    _check_model(d, body)
    ids = await asyncio.to_thread(chat_ids if chat else completion_ids, d.tokenizer, body)
    params = gen_params(body, len(ids), d.info.max_model_len, chat)
    if not d.engine.ready.is_set() or not d.engine.alive:
        return json_error(503, "model not ready", "model_not_ready",
                          headers={"Retry-After": str(d.retry_after_s)})
    loop, events = asyncio.get_running_loop(), asyncio.Queue[Event]()

    def sink(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # loop closed: nobody is listening any more
            pass

    req = GenRequest(ids, params, sink)
    try:
        d.engine.submit(req)
    except QueueFull as exc:
        d.metrics.count(d.metrics.rejected)
        return json_error(429, f"server busy: {exc}", "rate_limit_exceeded",
                          headers={"Retry-After": str(d.retry_after_s)})
    shaper = ResponseShaper(d.info.name, chat)
    try:
        if body.get("stream"):
            return await _stream(request, shaper, events, wants_usage_in_stream(body))
        return await _collect(shaper, events)
    finally:
        d.engine.cancel(req)  # no-op if it already finished


async def _collect(shaper: ResponseShaper, events: asyncio.Queue[Event]) -> web.Response:
    parts = []
    while True:
        event = await events.get()
        if event.kind == "token":
            parts.append(event.text)
        elif event.kind == "done":
            assert event.usage is not None
            return web.json_response(shaper.full("".join(parts), event.finish_reason, event.usage))
        else:
            return json_error(event.status, event.text, _error_code(event.status))


def _error_code(status: int) -> str:
    return "engine_unavailable" if status == 503 else "internal_error"


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _stream(request: web.Request, shaper: ResponseShaper, events: asyncio.Queue[Event],
                  include_usage: bool) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    try:
        if shaper.chat:
            await resp.write(_sse(shaper.chunk(None, role=True)))
        while True:
            event = await events.get()
            if event.kind == "token":
                await resp.write(_sse(shaper.chunk(event.text)))
                continue
            if event.kind == "done":
                await resp.write(_sse(shaper.chunk(None if shaper.chat else "", event.finish_reason)))
                if include_usage and event.usage is not None:
                    await resp.write(_sse(shaper.usage_chunk(event.usage)))
            else:
                await resp.write(_sse(error_body(event.text, event.status, None, _error_code(event.status))))
            await resp.write(_sse("[DONE]"))
            await resp.write_eof()
            return resp
    except ConnectionResetError:  # the client went away; the caller cancels the request
        return resp


# ---- tokenizer endpoints ---------------------------------------------------------------


async def tokenize(request: web.Request) -> web.Response:
    """vLLM's /tokenize: chat style when `messages` is present, else completion style."""
    d = request.app[DAEMON]
    body = await _json_body(request)
    _check_model(d, body)
    encode = chat_ids if "messages" in body else completion_ids
    ids = await asyncio.to_thread(encode, d.tokenizer, body)
    strs = [d.tokenizer.tokenizer.id_to_token(i) for i in ids] if body.get("return_token_strs") else None
    return web.json_response({"count": len(ids), "max_model_len": d.info.max_model_len,
                              "tokens": ids, "token_strs": strs})


async def detokenize(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    body = await _json_body(request)
    _check_model(d, body)
    tokens = body.get("tokens")
    vocab = d.tokenizer.vocab_size
    if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < vocab for t in tokens):
        raise BadRequest(f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
    return web.json_response({"prompt": d.tokenizer.decode(tokens)})


# ---- status endpoints ------------------------------------------------------------------


async def models(request: web.Request) -> web.Response:
    d = request.app[DAEMON]
    card = {"id": d.info.name, "object": "model", "created": 0, "owned_by": "kvgate",
            "root": str(d.info.path), "parent": None, "max_model_len": d.info.max_model_len}
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    """200 only when the model is loaded and the engine thread runs; else 503."""
    engine = request.app[DAEMON].engine
    if engine.ready.is_set() and engine.alive:
        return web.json_response({"status": "ok"})
    status = "error" if engine.load_error else "loading"
    return web.json_response({"status": status, "error": engine.load_error}, status=503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[DAEMON].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def cache_stats(request: web.Request) -> web.Response:
    """Daemon-specific: the prefix cache's tiers, read on the engine thread."""
    d = request.app[DAEMON]
    return web.json_response(await asyncio.wrap_future(d.engine.call(_snapshot)))


def _snapshot(engine: Engine) -> dict[str, Any]:
    cache = engine.cache
    if cache is None:
        return {"enabled": False}
    entries = cache.entries()
    return {"enabled": True, "hot_tokens": cache.stats.hot_tokens, "cold_tokens": cache.stats.cold_tokens,
            "cold_bytes": cache.stats.cold_bytes, "capacity_tokens": cache.capacity_tokens,
            "cold_capacity_tokens": cache.cold_capacity_tokens, "entries": len(entries),
            "pinned_tokens": sum(e.size for e in entries if e.pinned),
            "held_chunks": len(cache.held_keys()), "compressions": cache.stats.compressions,
            "restores": cache.stats.restores}
