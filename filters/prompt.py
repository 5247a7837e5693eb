"""`prompt` filter: extracts model and prompt from OpenAI completion and chat bodies.

Reads `ctx.json` (the parsed body) on `/v1/completions` and `/v1/chat/completions`
(any path ending in `/completions` or `/chat/completions`); writes `PROMPT`
and `ctx.stream`. Wrong types get a 400 naming the offending field.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from filters.base import CONTINUE, Filter, FilterResult, stop
from filters.keys import PROMPT, Prompt
from filters.registry import register
from kvkernel.context import RequestContext


class PromptError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode  # built once


def _digest(model: str | None, payload: Any) -> str:
    raw = _canonical([model, payload])
    return hashlib.blake2b(raw.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def parse_completion_prompt(value: Any) -> list[str | list[int]]:
    """`prompt` as a string, list of strings, list of ids, or list of id lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if not value:
            raise PromptError("prompt", "'prompt' must not be empty")
        if all(isinstance(p, str) for p in value):
            return list(value)
        if _is_token_list(value):
            return [list(value)]
        if all(_is_token_list(p) and p for p in value):
            return [list(p) for p in value]
    raise PromptError("prompt", "'prompt' must be a string, a list of strings, a list of token ids, "
                                "or a list of token-id lists")


def _check_content(content: Any, param: str) -> int:
    """Validate one message's content; returns its text length."""
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise PromptError(f"{param}[{j}]", "each content part must be an object with a string 'type'")
            text = part.get("text")
            if part["type"] == "text" and not isinstance(text, str):
                raise PromptError(f"{param}[{j}].text", "a text content part needs a string 'text'")
            total += len(text) if isinstance(text, str) else 0
        return total
    raise PromptError(param, "'content' must be a string, a list of content parts, or null")


def parse_messages(value: Any) -> tuple[list[dict[str, Any]], int]:
    if not isinstance(value, list) or not value:
        raise PromptError("messages", "'messages' must be a non-empty list of message objects")
    chars = 0
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise PromptError(f"messages[{i}]", "each message must be an object")
        if not isinstance(msg.get("role"), str):
            raise PromptError(f"messages[{i}].role", "each message needs a string 'role'")
        chars += _check_content(msg.get("content"), f"messages[{i}].content")
    return value, chars


def _common(body: dict[str, Any]) -> tuple[str | None, bool]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise PromptError("model", "'model' must be a string")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise PromptError("stream", "'stream' must be a boolean")
    return model, stream


def extract_prompt(path: str, body: dict[str, Any]) -> tuple[Prompt, bool] | None:
    """The prompt of a completion or chat request (None for other paths)."""
    if path.endswith("/chat/completions"):
        model, stream = _common(body)
        messages, chars = parse_messages(body.get("messages"))
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise PromptError("tools", "'tools' must be a list")
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise PromptError("chat_template_kwargs", "'chat_template_kwargs' must be an object")
        add_gen = body.get("add_generation_prompt", True)
        if not isinstance(add_gen, bool):
            raise PromptError("add_generation_prompt", "'add_generation_prompt' must be a boolean")
        digest = _digest(model, [messages, tools, kwargs, bool(add_gen)])
        return Prompt("chat", model, digest, messages=messages, tools=tools, chat_template_kwargs=kwargs,
                      add_generation_prompt=bool(add_gen), text_chars=chars), stream
    if path.endswith("/completions"):
        model, stream = _common(body)
        if "prompt" not in body:
            raise PromptError("prompt", "'prompt' is required")
        prompts = parse_completion_prompt(body["prompt"])
        chars = sum(len(p) for p in prompts)
        return Prompt("completion", model, _digest(model, prompts), prompts=prompts, text_chars=chars), stream
    return None


@register("prompt")
class PromptFilter(Filter):
    produces = (PROMPT,)

    async def on_request(self, ctx: RequestContext) -> FilterResult:
        if ctx.json is None or ctx.method != "POST":
            return CONTINUE
        try:
            found = extract_prompt(ctx.path, ctx.json)
        except PromptError as exc:
            return stop(400, str(exc), param=exc.param, code="invalid_prompt")
        except RecursionError:
            return stop(400, "request body is nested too deeply", code="invalid_json")
        if found is not None:
            ctx[PROMPT], ctx.stream = found
        return CONTINUE
