"""OpenAI / vLLM request parsing and response shapes for the MLX daemon (pure; no I/O).

Supported sampling fields: ``max_tokens`` (or ``max_completion_tokens``),
``temperature`` (default 1.0), ``top_p``, ``seed``, ``stop`` (string or list),
and vLLM's extras ``stop_token_ids`` and ``ignore_eos``. ``n`` must be 1.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from kvkernel.errors import error_body as kv_error_body
from mlxd.engine_types import GenParams, Usage

DEFAULT_COMPLETION_MAX_TOKENS = 16


class BadRequest(ValueError):
    """A client error; `param` names the offending field, `code` says what is wrong."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape, `type` from the status (kvkernel.errors' vocabulary)."""
    return kv_error_body(status, message, code=code, param=param)


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be a number in [{lo}, {hi}], got {value!r}", name)
    return float(value)


def _int_or_none(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadRequest(f"'{name}' must be an integer, got {value!r}", name)
    return value


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _seed(body: Mapping[str, Any]) -> int | None:
    """vLLM's range for `seed`: any signed 64-bit integer."""
    seed = _int_or_none(body, "seed")
    if seed is not None and not INT64_MIN <= seed <= INT64_MAX:
        raise BadRequest(f"'seed' must be in [{INT64_MIN}, {INT64_MAX}], got {seed}", "seed")
    return seed


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    """`max_completion_tokens` wins over `max_tokens` whenever it is given (0 included)."""
    value = _int_or_none(body, "max_completion_tokens")
    return _int_or_none(body, "max_tokens") if value is None else value


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise BadRequest("'stop' must be a string or a list of strings", "stop")


def gen_params(body: Mapping[str, Any], prompt_len: int, max_model_len: int, chat: bool) -> GenParams:
    """Validate sampling fields; `max_tokens` defaults to 16 (completions) or the rest of the context."""
    if body.get("n") not in (None, 1):
        raise BadRequest("only n=1 is supported", "n")
    for flag in ("stream", "ignore_eos"):
        if body.get(flag) is not None and not isinstance(body.get(flag), bool):
            raise BadRequest(f"'{flag}' must be a boolean", flag)
    if prompt_len == 0:
        raise BadRequest("the prompt is empty", "prompt")
    room = max_model_len - prompt_len
    if room < 1:
        raise BadRequest(f"This model's maximum context length is {max_model_len} tokens; "
                         f"the prompt has {prompt_len} tokens.", "messages" if chat else "prompt")
    max_tokens = _max_tokens(body)
    if max_tokens is None:
        max_tokens = room if chat else min(DEFAULT_COMPLETION_MAX_TOKENS, room)
    if max_tokens < 1 or max_tokens > room:
        raise BadRequest(f"'max_tokens' must be in [1, {room}] (context {max_model_len}, prompt "
                         f"{prompt_len}), got {max_tokens}", "max_tokens")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
        raise BadRequest("'stop_token_ids' must be a list of integers", "stop_token_ids")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise BadRequest("'top_p' must be in (0, 1]", "top_p")
    return GenParams(
        max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 100.0),
        top_p=top_p, seed=_seed(body), stop=_stop(body),
        stop_token_ids=tuple(stop_ids), ignore_eos=bool(body.get("ignore_eos", False)))


def wants_usage_in_stream(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options") or {}
    return isinstance(options, dict) and bool(options.get("include_usage"))


def usage_body(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


class ResponseShaper:
    """Builds the JSON bodies of one completion (`chat` selects the chat shapes)."""

    def __init__(self, model: str, chat: bool) -> None:
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _base(self, streaming: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        if streaming and self.chat:
            kind += ".chunk"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def full(self, text: str, finish_reason: str | None, usage: Usage) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": finish_reason}
        return self._base(False) | {"choices": [choice], "usage": usage_body(usage)}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice |= {"logprobs": None, "finish_reason": finish_reason}
        return self._base(True) | {"choices": [choice]}

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return self._base(True) | {"choices": [], "usage": usage_body(usage)}
