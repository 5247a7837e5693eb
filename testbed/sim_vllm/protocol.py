"""vLLM's OpenAI-compatible request and response shapes, without I/O.

Parsing turns a JSON body into token ids exactly as the engine will prefill
them (chat: template rendered, then encoded without special tokens), so
`/tokenize` and the completion endpoints can never disagree.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvkernel.errors import error_body as kv_error_body
from testbed.sim_vllm.tokenizer import SimTokenizer

DEFAULT_MAX_TOKENS = 16


class RequestError(ValueError):
    """A client error; `status`, `param` and `code` go into the OpenAI error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """kvgate's error vocabulary (kvkernel.errors); real vLLM says `BadRequestError` and a numeric code."""
    return kv_error_body(status, message, code=code, param=param)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    model: str
    prompts: list[list[int]]
    max_tokens: int
    stream: bool
    include_usage: bool


def _field(body: Mapping[str, Any], name: str, types: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        raise RequestError(f"'{name}' has the wrong type: {type(value).__name__}", param=name)
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def check_model(body: Mapping[str, Any], served: str) -> str:
    model = _field(body, "model", str, served)
    if model != served:
        raise RequestError(f"The model `{model}` does not exist.", status=404, param="model", code="model_not_found")
    return str(model)


def _common(body: Mapping[str, Any], served: str, prompts: list[list[int]], max_model_len: int,
            max_tokens_key: str = "max_tokens") -> GenerationRequest:
    max_tokens = _field(body, max_tokens_key, int, None)
    if max_tokens is None and max_tokens_key != "max_tokens":
        max_tokens = _field(body, "max_tokens", int, None)
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if max_tokens < 0:
        raise RequestError(f"max_tokens must be >= 0, got {max_tokens}", param="max_tokens")
    if _field(body, "n", int, 1) != 1:
        raise RequestError("sim-vllm supports n=1 only", param="n")
    for ids in prompts:
        if len(ids) + max_tokens > max_model_len:
            raise RequestError(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the completion).",
                param="max_tokens")
    stream = bool(_field(body, "stream", bool, False))
    options = _field(body, "stream_options", dict, {})
    return GenerationRequest(check_model(body, served), prompts, max_tokens, stream,
                             bool(options.get("include_usage", False)))


def completion_prompts(body: Mapping[str, Any], tokenizer: SimTokenizer) -> list[list[int]]:
    """The prompt field (string, list of strings, token ids, list of token-id lists) as id lists."""
    prompt = body.get("prompt")
    add_special = bool(_field(body, "add_special_tokens", bool, True))
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise RequestError("'prompt' must be a string, a list of strings, or token ids", param="prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompts.append(tokenizer.encode(item, add_special_tokens=add_special))
        elif isinstance(item, list) and all(_is_token(t) for t in item):
            prompts.append(list(item))
        else:
            raise RequestError("'prompt' must be a string, a list of strings, or token ids", param="prompt")
    if any(not ids for ids in prompts):
        raise RequestError("prompt must not be empty", param="prompt")
    return prompts


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parse_completion(body: Mapping[str, Any], tokenizer: SimTokenizer, served: str,
                     max_model_len: int) -> GenerationRequest:
    req = _common(body, served, completion_prompts(body, tokenizer), max_model_len)
    if req.stream and len(req.prompts) > 1:
        raise RequestError("sim-vllm streams one prompt per request", param="prompt")
    return req


def normalise_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages with multi-part text content joined by newlines, as vLLM's "string" content format does."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            texts = [part.get("text") for part in content if isinstance(part, dict)]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise RequestError(f"messages[{i}].content: only text parts are supported", param="messages")
            content = "\n".join(str(t) for t in texts)
        elif content is not None and not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or a list of parts", param="messages")
        out.append({**message, "content": content})
    return out


def chat_prompt_ids(body: Mapping[str, Any], tokenizer: SimTokenizer) -> list[int]:
    """Render the chat template and encode it without adding special tokens again."""
    messages = normalise_messages(body.get("messages"))
    tools = _field(body, "tools", list, None)
    kwargs = _field(body, "chat_template_kwargs", dict, {})
    add_generation_prompt = bool(_field(body, "add_generation_prompt", bool, True))
    try:
        text = tokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                     tools=tools, chat_template_kwargs=kwargs)
    except ValueError as exc:
        raise RequestError(str(exc), param="messages") from exc
    return tokenizer.encode(text, add_special_tokens=bool(_field(body, "add_special_tokens", bool, False)))


def parse_chat(body: Mapping[str, Any], tokenizer: SimTokenizer, served: str,
               max_model_len: int) -> GenerationRequest:
    return _common(body, served, [chat_prompt_ids(body, tokenizer)], max_model_len, "max_completion_tokens")


def tokenize_ids(body: Mapping[str, Any], tokenizer: SimTokenizer) -> list[int]:
    """vLLM's /tokenize: chat style when `messages` is present, else completion style."""
    if "messages" in body:
        return chat_prompt_ids(body, tokenizer)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError("'prompt' must be a string", param="prompt")
    return tokenizer.encode(prompt, add_special_tokens=bool(_field(body, "add_special_tokens", bool, True)))


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason,
            "stop_reason": None, "prompt_logprobs": None}


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None,
            "message": {"role": "assistant", "content": text, "refusal": None, "tool_calls": [],
                        "reasoning_content": None}}


def chat_delta(index: int, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason,
            "stop_reason": None}


def envelope(request_id: str, model: str, obj: str, choices: Sequence[dict[str, Any]],
             usage_: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model,
            "choices": list(choices), "usage": usage_}
