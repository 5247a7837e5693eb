"""The chain's vocabulary: what filters publish for later filters and for pickers.

Each value type sits beside its `StateKey`. A filter names the keys it needs in
`consumes` and the keys it writes in `produces`; `check_chain` (filters.registry)
rejects a chain in which a key is consumed before any filter produced it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from kvkernel.blocks import block_keys
from kvkernel.context import RequestContext, StateKey

PromptKind = Literal["completion", "chat"]
Tier = Literal["prefix-index", "lmcache", "local-index", "none"]


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


@dataclass(frozen=True, slots=True)
class Tokens:
    """The prompt's token ids as the engine will prefill them, and where they came from
    ("request", "cache", "local", "remote")."""

    ids: list[int]
    source: str


@dataclass(slots=True)
class CacheHints:
    """Where the prompt's KV cache lives: matched prefix tokens per endpoint id."""

    tier: Tier = "none"
    matched_tokens: dict[str, int] = field(default_factory=dict)
    preferred_endpoint: str | None = None
    lookup_ms: float | None = None
    reason: str | None = None


PROMPT: StateKey[Prompt] = StateKey("prompt", Prompt)
TOKENS: StateKey[Tokens] = StateKey("tokens", Tokens)
CACHE_HINTS: StateKey[CacheHints] = StateKey("cache_hints", CacheHints)
# An endpoint id a filter wants this request to go to (honoured by the pre-pick step
# when the cluster's picker does not weigh cache hints itself).
PREFERRED_ENDPOINT: StateKey[str] = StateKey("preferred_endpoint", str)
# The prompt's prefix keys over 16-token blocks (see kvkernel.blocks), computed once.
BLOCK_KEYS: StateKey[list[int]] = StateKey("block_keys", list)
# A per-request time-to-first-token objective in seconds (from a request header).
TTFT_SLO: StateKey[float] = StateKey("ttft_slo", float)
# A client-chosen affinity key (e.g. a session header) for hashing pickers.
AFFINITY_KEY: StateKey[str] = StateKey("affinity_key", str)
# The id of the API key the `auth` filter accepted (never the key itself).
API_KEY_ID: StateKey[str] = StateKey("api_key_id", str)


def token_ids(ctx: RequestContext) -> list[int] | None:
    """The request's token ids, or None (a shortcut for the common read)."""
    tokens: Tokens | None = ctx.get(TOKENS)
    return tokens.ids if tokens is not None else None


_NO_MATCHES: Mapping[str, int] = MappingProxyType({})


def hinted_matches(ctx: RequestContext) -> Mapping[str, int]:
    """Prefix tokens the cache hints credit each endpoint id with (empty without hints)."""
    hints = ctx.get(CACHE_HINTS)
    return hints.matched_tokens if hints is not None else _NO_MATCHES


def matched_tokens(ctx: RequestContext, endpoint_id: str) -> int:
    """Prefix tokens the cache hints credit `endpoint_id` with (0 without hints)."""
    return hinted_matches(ctx).get(endpoint_id, 0)


def preferred_endpoint(ctx: RequestContext) -> str | None:
    """The endpoint a filter asked for, else the cache hints' preferred one."""
    explicit: str | None = ctx.get(PREFERRED_ENDPOINT)
    if explicit:
        return explicit
    hints: CacheHints | None = ctx.get(CACHE_HINTS)
    return hints.preferred_endpoint if hints is not None else None


def prompt_block_keys(ctx: RequestContext) -> list[int] | None:
    """The request's block keys (computed from `TOKENS` on first use), or None without tokens."""
    keys: list[int] | None = ctx.get(BLOCK_KEYS)
    if keys is None:
        ids = token_ids(ctx)
        if ids is None:
            return None
        keys = block_keys(ids)
        ctx[BLOCK_KEYS] = keys
    return keys
