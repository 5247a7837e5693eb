"""Tokenizer backends for the `tokenizer` filter: prompt -> the ids the engine prefills.

- `LocalTokenizer`: in-process, from a model directory (`tokenizer.json` + the chat
  template in `tokenizer_config.json`), through `kvtok.chat_tokens` — the very code
  the MLX daemon uses for generation and `/tokenize` (it imports only `tokenizers`
  and `jinja2`, never MLX or transformers). Prompts of `min_chars_offload`
  characters or more, and chats with tools or tool calls, are tokenized on a
  small thread pool, off the event loop.
- `RemoteTokenizer`: `POST {endpoint}/tokenize` on an MLX daemon or vLLM, chat
  style for chat requests (all messages, tools, template kwargs), completion style
  otherwise, through its own circuit breaker, retries and a time budget.

Both raise `TokenizeFailed(reason, message)` and nothing else for a prompt they
cannot tokenize; `reason` is one of `REASONS`.
"""

from __future__ import annotations

import asyncio
import json
import time
from array import array
from collections.abc import Awaitable, Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import httpx
from cachetools import TTLCache

from filters.keys import Prompt
from kvkernel.breaker import CircuitBreaker, CircuitOpenError
from kvkernel.resilience import DependencyDown, ResilientCaller, RetrySettings
from kvtok.chat_tokens import ChatTokenizer, PromptError

# unavailable: connect error / timeout / 5xx after retries; circuit_open: breaker open;
# rejected: the tokenizer answered 4xx; bad_answer: 2xx without a token list;
# bad_prompt: the prompt cannot be tokenized (e.g. the chat template raised).
REASONS = ("unavailable", "circuit_open", "rejected", "bad_answer", "bad_prompt")
# A tokenize call has a small budget (default 200 ms): one quick retry at most.
REMOTE_RETRY = RetrySettings(max_attempts=2, base_backoff=0.01, max_backoff=0.05)


class TokenizeFailed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# Body fields besides the prompt that change the ids the engine prefills (vLLM's names).
# Completions: add_special_tokens (default true). Chat: add_special_tokens (default
# false) and continue_final_message (default false).
ENGINE_OPTIONS = ("add_special_tokens", "continue_final_message")
Options = Mapping[str, bool]


def engine_options(body: Mapping[str, Any] | None, kind: str) -> dict[str, bool]:
    """The `ENGINE_OPTIONS` a request body sets (only those present, as booleans)."""
    if not body:
        return {}
    names = ENGINE_OPTIONS if kind == "chat" else ENGINE_OPTIONS[:1]
    return {name: bool(body[name]) for name in names if name in body}


class TokenizerBackend(Protocol):
    source: str  # what ctx.token_source says when this backend produced the ids

    async def tokenize(self, prompt: Prompt, options: Options | None = None) -> list[int]: ...

    async def close(self) -> None: ...


def _first_text(prompt: Prompt) -> str:
    first = prompt.first_prompt
    if not isinstance(first, str):
        raise TokenizeFailed("bad_prompt", "completion prompt is not text")
    return first


class LocalTokenizer:
    """In-process tokenizer; bit-identical to the MLX daemon's ids for the same model dir."""

    source = "local"

    def __init__(self, chat_tokenizer: ChatTokenizer, *, min_chars_offload: int = 4096,
                 max_workers: int = 2) -> None:
        self.chat_tokenizer = chat_tokenizer
        self.min_chars_offload = min_chars_offload
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kvgate-tokenizer")
        self.offloaded = 0  # prompts tokenized on the pool

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, min_chars_offload: int = 4096) -> LocalTokenizer:
        return cls(ChatTokenizer.from_dir(model_dir), min_chars_offload=min_chars_offload)

    def encode(self, prompt: Prompt, options: Options | None = None) -> list[int]:
        """Synchronous: chat style (template rendered, no special tokens added) or
        completion style (`add_special_tokens=True`), as vLLM and the daemon default;
        `options` (see `engine_options`) override those defaults as the body did."""
        ct = self.chat_tokenizer
        opts = options or {}
        try:
            if prompt.kind == "chat":
                return ct.encode_chat(prompt.messages, prompt.add_generation_prompt, prompt.tools,
                                      prompt.chat_template_kwargs,
                                      add_special_tokens=opts.get("add_special_tokens", False),
                                      continue_final_message=opts.get("continue_final_message", False))
            return ct.encode_prompt(_first_text(prompt), add_special_tokens=opts.get("add_special_tokens", True))
        except PromptError as exc:
            raise TokenizeFailed("bad_prompt", str(exc)) from None

    def offloads(self, prompt: Prompt) -> bool:
        """Tokenize on the pool? `text_chars` counts message text only: tools and tool
        calls (JSON schemas, arguments), rendered by the template too, can be far larger."""
        if prompt.text_chars >= self.min_chars_offload or prompt.tools:
            return True
        return prompt.kind == "chat" and any(m.get("tool_calls") for m in prompt.messages)

    async def tokenize(self, prompt: Prompt, options: Options | None = None) -> list[int]:
        if not self.offloads(prompt):
            return self.encode(prompt, options)
        self.offloaded += 1
        return await asyncio.get_running_loop().run_in_executor(self._executor,
                                                                partial(self.encode, prompt, options))

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def tokenize_body(prompt: Prompt, options: Options | None = None) -> dict[str, Any]:
    """The `/tokenize` request for `prompt` (vLLM's chat or completion style), with
    the request's `options` (see `engine_options`)."""
    body: dict[str, Any] = {} if prompt.model is None else {"model": prompt.model}
    if prompt.kind == "chat":
        body.update(messages=prompt.messages, add_generation_prompt=prompt.add_generation_prompt)
        if prompt.tools is not None:
            body["tools"] = prompt.tools
        if prompt.chat_template_kwargs is not None:
            body["chat_template_kwargs"] = prompt.chat_template_kwargs
        body.update(options or {})
        return body
    body.update(prompt=_first_text(prompt), add_special_tokens=True)
    body.update({k: v for k, v in (options or {}).items() if k == "add_special_tokens"})
    return body


def _token_list(answer: Any) -> list[int]:
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise TokenizeFailed("bad_answer", "/tokenize answer has no 'tokens' list of integers")
    return tokens


class RemoteTokenizer:
    """`POST {endpoint}/tokenize` with a breaker, retries and a whole-call `timeout`."""

    source = "remote"

    def __init__(self, endpoint: str, http: httpx.AsyncClient, *, timeout: float = 0.2,
                 retry: RetrySettings = REMOTE_RETRY,
                 breaker: CircuitBreaker | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.url = endpoint.rstrip("/") + "/tokenize"
        self.timeout = timeout
        self.breaker = breaker if breaker is not None else CircuitBreaker("tokenizer")
        self._http = http
        self._caller = ResilientCaller(self.breaker, retry, sleep)

    async def tokenize(self, prompt: Prompt, options: Options | None = None) -> list[int]:
        body = tokenize_body(prompt, options)

        async def exchange() -> Any:
            response = await self._http.post(self.url, json=body, timeout=self.timeout)
            response.raise_for_status()
            return response.json()

        try:
            answer = await self._caller.call(exchange, timeout=self.timeout)
        except CircuitOpenError as exc:
            raise TokenizeFailed("circuit_open", str(exc)) from None
        except DependencyDown as exc:
            raise TokenizeFailed("unavailable", f"{self.url}: {exc}") from None
        except httpx.HTTPStatusError as exc:
            raise TokenizeFailed("rejected", f"{self.url}: HTTP {exc.response.status_code}") from None
        except (ValueError, httpx.HTTPError) as exc:
            raise TokenizeFailed("bad_answer", f"{self.url}: {type(exc).__name__}: {exc}") from None
        return _token_list(answer)

    async def close(self) -> None:
        """The HTTP client belongs to the app; nothing to release."""


def cache_key(prompt: Prompt, options: Options | None = None) -> Hashable:
    """Model + canonical prompt + options. `prompt.digest` covers model, messages/prompts
    and tools; the template inputs and engine options it leaves out are added here."""
    opts = tuple(sorted((options or {}).items()))
    if prompt.kind == "completion":
        return ("completion", prompt.digest, opts)
    kwargs = json.dumps(prompt.chat_template_kwargs, sort_keys=True) if prompt.chat_template_kwargs else ""
    return ("chat", prompt.digest, prompt.add_generation_prompt, kwargs, opts)


ENTRY_OVERHEAD = 200  # bytes an entry costs besides its ids (key tuple, array header, cache links)


def _nbytes(ids: array[int]) -> int:
    return ENTRY_OVERHEAD + ids.itemsize * len(ids)


class TokenCache:
    """A bounded TTL cache of token ids (stored compactly: 4 bytes a token).

    Bounded twice: `max_size` entries and `max_bytes` of ids (long-context prompts
    would otherwise make `max_size` entries cost gigabytes); the least recently used
    entries go first. A prompt larger than `max_bytes` is not cached.
    `max_size: 0` disables caching."""

    def __init__(self, max_size: int, ttl: float, clock: Callable[[], float] = time.monotonic,
                 max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_size = max_size
        self._cache: TTLCache[Hashable, array[int]] | None = (
            TTLCache(maxsize=max_bytes, ttl=ttl, timer=clock, getsizeof=_nbytes) if max_size > 0 else None)

    @property
    def enabled(self) -> bool:
        return self._cache is not None

    def get(self, key: Hashable) -> list[int] | None:
        if self._cache is None:
            return None
        ids = self._cache.get(key)
        return ids.tolist() if ids is not None else None

    def put(self, key: Hashable, ids: list[int]) -> None:
        cache = self._cache
        if cache is None:
            return
        try:
            compact = array("I", ids)
        except OverflowError:  # an id outside uint32: keep it out of the cache
            return
        if key not in cache:
            cache.expire()
            while len(cache) >= self.max_size:
                cache.popitem()
        try:
            cache[key] = compact
        except ValueError:  # larger than max_bytes on its own
            return

    def __len__(self) -> int:
        return len(self._cache) if self._cache is not None else 0

    @property
    def nbytes(self) -> int:
        """Bytes the cached ids take (with a per-entry overhead estimate)."""
        return int(self._cache.currsize) if self._cache is not None else 0
