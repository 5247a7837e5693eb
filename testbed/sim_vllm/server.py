"""aiohttp app exposing vLLM's HTTP surface over the simulated engine.

Routes: POST /v1/completions, POST /v1/chat/completions (JSON or SSE ending in
`data: [DONE]`), POST /tokenize, POST /detokenize, GET /v1/models, GET /health,
GET /metrics, GET /version, POST /reset_prefix_cache (vLLM's dev endpoint: drops
every cached block no running request uses). Testbed extras: GET /sim/state (engine and cache
counters) and POST /sim/health {"healthy": bool} to make /health answer 503.
Errors use the OpenAI shape; a bad request never stops the server.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import asdict
from typing import Any

from aiohttp import web

from testbed.sim_vllm import metrics, protocol
from testbed.sim_vllm.engine import Engine, RequestResult
from testbed.sim_vllm.protocol import GenerationRequest, RequestError
from testbed.sim_vllm.reporting import ChunkSink

ENGINE = web.AppKey("engine", Engine)
MODEL = web.AppKey("model", str)
INSTANCE_ID = web.AppKey("instance_id", str)
HEALTHY = web.AppKey("healthy", dict)
SINK = web.AppKey("chunk_sink", ChunkSink)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_error(message: str, status: int, param: str | None = None, code: str | None = None) -> web.Response:
    return web.json_response(protocol.error_body(message, status, param, code), status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Client errors become OpenAI-shaped 4xx; anything unexpected a 500, never a dead server."""
    try:
        return await handler(request)
    except RequestError as exc:
        return _json_error(str(exc), exc.status, exc.param, exc.code)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json_error(exc.reason, exc.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as exc:  # noqa: BLE001 - report, keep serving
        return _json_error(f"internal error: {type(exc).__name__}: {exc}", 500, code="internal_error")


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"malformed JSON body: {exc}") from exc
    except RecursionError as exc:  # json.loads gives up on deeply nested arrays/objects
        raise RequestError("malformed JSON body: nested too deeply") from exc
    if not isinstance(body, dict):
        raise RequestError("the JSON body must be an object")
    return body


async def _run(engine: Engine, ids: list[int], max_tokens: int) -> tuple[list[int], RequestResult]:
    result = RequestResult(len(ids))
    async with aclosing(engine.generate(ids, max_tokens, result)) as tokens:
        out = [t async for t in tokens]
    return out, result


def _request_id(request: web.Request, prefix: str) -> str:
    return request.headers.get("x-request-id") or f"{prefix}-{uuid.uuid4().hex}"


async def completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    gen = protocol.parse_completion(await _body(request), engine.tokenizer, request.app[MODEL],
                                    engine.config.max_model_len)
    return await _respond(request, gen, "cmpl", chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    gen = protocol.parse_chat(await _body(request), engine.tokenizer, request.app[MODEL],
                              engine.config.max_model_len)
    return await _respond(request, gen, "chatcmpl", chat=True)


async def _respond(request: web.Request, gen: GenerationRequest, prefix: str, *, chat: bool) -> web.StreamResponse:
    request_id = _request_id(request, prefix)
    if gen.stream:
        return await _stream(request, gen, request_id, chat=chat)
    engine = request.app[ENGINE]
    runs = await asyncio.gather(*(_run(engine, ids, gen.max_tokens) for ids in gen.prompts))
    make_choice = protocol.chat_choice if chat else protocol.completion_choice
    choices = [make_choice(i, engine.tokenizer.decode(out), res.finish_reason) for i, (out, res) in enumerate(runs)]
    usage = protocol.usage(sum(r.prompt_tokens for _, r in runs), sum(r.output_tokens for _, r in runs),
                           sum(r.cached_tokens for _, r in runs))
    body = protocol.envelope(request_id, gen.model, "chat.completion" if chat else "text_completion", choices, usage)
    return web.json_response(body, headers={"x-request-id": request_id})


async def _stream(request: web.Request, gen: GenerationRequest, request_id: str, *, chat: bool) -> web.StreamResponse:
    engine = request.app[ENGINE]
    obj = "chat.completion.chunk" if chat else "text_completion"
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "x-request-id": request_id})
    await resp.prepare(request)

    async def send(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> None:
        chunk = protocol.envelope(request_id, gen.model, obj, choices, usage)
        if usage is None:
            del chunk["usage"]
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

    result = RequestResult(len(gen.prompts[0]))
    out: list[int] = []
    text = ""
    try:
        async with aclosing(engine.generate(gen.prompts[0], gen.max_tokens, result)) as tokens:
            async for token in tokens:
                if chat and not out:
                    await send([protocol.chat_delta(0, {"role": "assistant", "content": ""}, None)])
                out.append(token)
                new_text = engine.tokenizer.decode(out)
                piece, text = new_text[len(text):], new_text
                # As vLLM does, the last token's chunk carries the finish reason.
                finish = "length" if len(out) == gen.max_tokens else None
                await send([protocol.chat_delta(0, {"content": piece}, finish) if chat
                            else protocol.completion_choice(0, piece, finish)])
        if not out:  # max_tokens == 0
            await send([protocol.chat_delta(0, {"role": "assistant", "content": ""}, result.finish_reason) if chat
                        else protocol.completion_choice(0, "", result.finish_reason)])
        if gen.include_usage:
            await send([], protocol.usage(result.prompt_tokens, result.output_tokens, result.cached_tokens))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client went away; aclosing already stopped the generation
    return resp


async def tokenize(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await _body(request)
    if "model" in body:
        protocol.check_model(body, request.app[MODEL])
    ids = protocol.tokenize_ids(body, engine.tokenizer)
    return web.json_response({"count": len(ids), "max_model_len": engine.config.max_model_len,
                              "tokens": ids, "token_strs": None})


async def detokenize(request: web.Request) -> web.Response:
    body = await _body(request)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise RequestError("'tokens' must be a list of integers", param="tokens")
    return web.json_response({"prompt": request.app[ENGINE].tokenizer.decode(tokens)})


async def models(request: web.Request) -> web.Response:
    model = request.app[MODEL]
    card = {"id": model, "object": "model", "created": int(time.time()), "owned_by": "vllm", "root": model,
            "parent": None, "max_model_len": request.app[ENGINE].config.max_model_len, "permission": []}
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[HEALTHY]["healthy"] else 503)


async def metrics_text(request: web.Request) -> web.Response:
    text = metrics.render(request.app[ENGINE], request.app[MODEL])
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": "0.0.0-sim"})


async def sim_state(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    stats = engine.stats
    return web.json_response({
        "instance_id": request.app[INSTANCE_ID], "model": request.app[MODEL],
        "config": asdict(engine.config), "cache": engine.cache.stats(),
        "running": stats.running, "waiting": stats.waiting, "kv_cache_usage": engine.kv_cache_usage(),
        "prefix_queries": stats.prefix_queries, "prefix_hits": stats.prefix_hits,
        "reporter": _reporter_stats(request.app),
    })


def _reporter_stats(app: web.Application) -> dict[str, int] | None:
    sink = app.get(SINK)
    reporter = sink.reporter if sink is not None else None
    if reporter is None:
        return None
    return {**reporter.stats, "registered": int(reporter.registered)}


async def reset_prefix_cache(request: web.Request) -> web.Response:
    request.app[ENGINE].cache.clear()
    return web.Response(status=200)


async def sim_health(request: web.Request) -> web.Response:
    body = await _body(request)
    if not isinstance(body.get("healthy"), bool):
        raise RequestError("'healthy' must be a boolean", param="healthy")
    request.app[HEALTHY]["healthy"] = body["healthy"]
    return web.json_response({"healthy": body["healthy"]})


def make_app(engine: Engine, *, model: str, instance_id: str, sink: ChunkSink | None = None) -> web.Application:
    """The sim-vllm app; callers add reporting to `app.cleanup_ctx` if wanted (`sink` shows its stats)."""
    app = web.Application(middlewares=[errors_middleware], client_max_size=64 * 2**20)
    app[ENGINE] = engine
    app[MODEL] = model
    app[INSTANCE_ID] = instance_id
    app[HEALTHY] = {"healthy": True}
    if sink is not None:
        app[SINK] = sink
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_text)
    app.router.add_get("/version", version)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    app.router.add_get("/sim/state", sim_state)
    app.router.add_post("/sim/health", sim_health)
    return app
