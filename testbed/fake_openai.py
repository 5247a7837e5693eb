"""A small, fast OpenAI-style backend for gateway tests and the overhead benchmark.

Speaks the real wire format (completions, chat, SSE with `data: [DONE]`,
`/v1/models`, `/health`, `/metrics`) with deterministic answers and knobs that
tests drive: a status to answer with, a delay before the first byte, a gate that
holds a stream after its first chunk, and health on/off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class FakeBackend:
    backend_id: str
    model: str = "fake-model"
    status: int | None = None  # answer every generation request with this status
    first_byte_delay: float = 0.0
    stream_chunks: int = 4
    healthy: bool = True
    cached_tokens: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    stream_gate: asyncio.Event | None = None  # if set, streams pause after the first chunk until set
    cancelled: int = 0  # streams whose client went away mid-generation
    requests: list[dict[str, Any]] = field(default_factory=list)
    seen_headers: list[dict[str, str]] = field(default_factory=list)


FAKE_KEY = web.AppKey("fake_backend", FakeBackend)


def completion_body(fake: FakeBackend, chat: bool, prompt_tokens: int) -> dict[str, Any]:
    choice: dict[str, Any] = (
        {"index": 0, "message": {"role": "assistant", "content": f"hello from {fake.backend_id}"},
         "finish_reason": "stop"} if chat else
        {"index": 0, "text": f"hello from {fake.backend_id}", "finish_reason": "stop"}
    )
    return {
        "id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion",
        "created": 1700000000, "model": fake.model, "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 4, "total_tokens": prompt_tokens + 4,
                  "prompt_tokens_details": {"cached_tokens": fake.cached_tokens}},
    }


async def generate(request: web.Request) -> web.StreamResponse:
    fake = request.app[FAKE_KEY]
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):  # as vLLM: a client error, not a server one
        return web.json_response({"error": {"message": "body must be a JSON object", "type": "BadRequestError",
                                             "param": None, "code": 400}}, status=400)
    fake.requests.append(body)
    fake.seen_headers.append(dict(request.headers))
    if fake.first_byte_delay:
        await asyncio.sleep(fake.first_byte_delay)
    if fake.status is not None:
        return web.json_response({"error": {"message": "forced", "type": "x", "param": None, "code": None}},
                                 status=fake.status)
    chat = request.path.endswith("/chat/completions")
    prompt_tokens = len(json.dumps(body.get("messages") or body.get("prompt"))) // 4
    if not body.get("stream"):
        return web.json_response(completion_body(fake, chat, prompt_tokens),
                                 headers={"x-backend-id": fake.backend_id})
    return await _stream(request, fake, body, chat, prompt_tokens)


async def _stream(request: web.Request, fake: FakeBackend, body: dict[str, Any], chat: bool,
                  prompt_tokens: int) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "x-backend-id": fake.backend_id})
    await resp.prepare(request)
    for i in range(fake.stream_chunks):
        delta = {"delta": {"content": f"tok{i} "}} if chat else {"text": f"tok{i} "}
        event = {"id": "cmpl-fake", "model": fake.model, "choices": [{"index": 0, **delta, "finish_reason": None}]}
        await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        if i == 0 and fake.stream_gate is not None:
            try:
                await fake.stream_gate.wait()
            except asyncio.CancelledError:
                fake.cancelled += 1
                raise
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):  # as OpenAI and vLLM: only when asked
        final = completion_body(fake, chat, prompt_tokens)
        usage = {"id": "cmpl-fake", "choices": [], "usage": final["usage"]}
        await resp.write(f"data: {json.dumps(usage)}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def health(request: web.Request) -> web.Response:
    fake = request.app[FAKE_KEY]
    return web.Response(status=200 if fake.healthy else 503, text="ok" if fake.healthy else "unhealthy")


async def models(request: web.Request) -> web.Response:
    fake = request.app[FAKE_KEY]
    return web.json_response({"object": "list", "data": [
        {"id": fake.model, "object": "model", "created": int(time.time()), "owned_by": fake.backend_id}]})


async def metrics(request: web.Request) -> web.Response:
    fake = request.app[FAKE_KEY]
    text = (f'vllm:num_requests_running{{model_name="{fake.model}"}} 0\n'
            f'vllm:num_requests_waiting{{model_name="{fake.model}"}} {fake.waiting}\n'
            f'vllm:kv_cache_usage_perc{{model_name="{fake.model}"}} {fake.kv_usage}\n')
    return web.Response(text=text, content_type="text/plain")


def create_fake_app(fake: FakeBackend) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[FAKE_KEY] = fake
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    return app


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="fake-openai")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--id", default="fake")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(create_fake_app(FakeBackend(args.id)), host="127.0.0.1", port=args.port, access_log=None,
                print=None, handler_cancellation=True)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
