"""The typed per-request context that filters read and write, and the proxy fills in.

A leaf module: imports nothing else from the project.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

PromptKind = Literal["completion", "chat"]
Tier = Literal["lmcache", "local-index", "none"]


@dataclass(slots=True)
class Prompt:
    """What the `prompt` filter extracted from an OpenAI request body.

    Completion requests carry `prompts` (one entry per prompt: a string or a list of
    token ids); chat requests carry `messages` (all of them, in order) and `tools`.
    `digest` is a hash of the model and canonical prompt, safe to log.
    """

    kind: PromptKind
    model: str | None
    digest: str
    prompts: list[str | list[int]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    text_chars: int = 0

    @property
    def first_prompt(self) -> str | list[int] | None:
        return self.prompts[0] if self.prompts else None


@dataclass(slots=True)
class CacheHints:
    """What the `kvcache` filter learned about where the prompt's KV cache lives."""

    tier: Tier = "none"
    matched_tokens: dict[str, int] = field(default_factory=dict)  # endpoint id -> prefix tokens cached
    preferred_endpoint: str | None = None
    lookup_ms: float | None = None
    reason: str | None = None


@dataclass(slots=True)
class Usage:
    """Token usage the backend reported (parsed from the response's `usage`)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None


@dataclass(slots=True)
class RequestContext:
    """Per-request state. Filters write their findings here; nothing is string-keyed
    except `log_fields`, which is free-form extra data for the access log."""

    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    received_at: float = field(default_factory=time.time)
    route: str | None = None
    cluster: str | None = None
    body: bytes = b""
    json: dict[str, Any] | None = None
    stream: bool = False
    prompt: Prompt | None = None
    token_ids: list[int] | None = None
    token_source: str | None = None
    hints: CacheHints = field(default_factory=CacheHints)
    preferred_endpoint: str | None = None
    # Filled by the proxy.
    endpoint: str | None = None
    attempts: int = 0
    status: int | None = None
    bytes_out: int = 0
    ttfb_ms: float | None = None
    latency_ms: float | None = None
    error: str | None = None
    decision: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    filter_ms: dict[str, float] = field(default_factory=dict)
    log_fields: dict[str, Any] = field(default_factory=dict)

    @property
    def retries(self) -> int:
        return max(0, self.attempts - 1)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0


CONTEXT_KEY = web.RequestKey("kvgate_context", RequestContext)
