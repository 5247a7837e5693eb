"""`tokenizer` filter: the prompt's token ids, exactly as the engine will prefill them.

Reads `PROMPT` (set by the `prompt` filter). Writes `TOKENS` (ids and their
source):
- `"request"`: a completion prompt given as token ids is used as is;
- `"cache"`: a hit in the bounded TTL token cache (key: model + canonical prompt);
- `"local"` / `"remote"`: the configured backend produced them (see `filters.tokenization`).

Body fields that change the engine's ids (`add_special_tokens`, and for chat
`continue_final_message`) are honoured as the engine honours them.

For a completion request with several prompts, the first one is tokenized (it is
what routing looks at). On any failure (remote down, breaker open, time budget
spent, template error) the request CONTINUEs without token ids — routing then
falls back — the failure is counted by reason in
`kvgate_tokenizer_failures_total` and noted in the access log as
`tokenizer_error`. This filter never fails a request.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from filters.base import CONTINUE, Filter, FilterResult, Services
from filters.keys import PROMPT, TOKENS, Tokens
from filters.registry import register
from filters.tokenization import (
    REMOTE_RETRY,
    LocalTokenizer,
    RemoteTokenizer,
    TokenCache,
    TokenizeFailed,
    TokenizerBackend,
    cache_key,
    engine_options,
)
from kvkernel.breaker import BreakerState
from kvkernel.context import RequestContext
from kvkernel.decode import Bytes, FieldError, Seconds
from kvkernel.metric_children import Children
from kvkernel.resilience import BreakerSettings, RetrySettings

log = logging.getLogger(__name__)
_BREAKER_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@dataclass(frozen=True, slots=True)
class TokenCacheSettings:
    """`cache:` — at most `max_size` entries (0 disables the cache) and `max_bytes`
    of ids, each kept for `ttl`."""

    max_size: int = 10000
    ttl: Seconds = 600.0
    max_bytes: Bytes = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_size < 0:
            raise FieldError("max_size", f"must be >= 0, got {self.max_size}")
        if self.ttl <= 0:
            raise FieldError("ttl", f"must be > 0, got {self.ttl}")
        if self.max_bytes < 1:
            raise FieldError("max_bytes", f"must be >= 1 byte, got {self.max_bytes}")


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    backend: Literal["local", "remote"]
    model_dir: str | None = None  # local: directory with tokenizer.json (+ tokenizer_config.json)
    endpoint: str | None = None  # remote: base URL of an MLX daemon or vLLM (POST {endpoint}/tokenize)
    cache: TokenCacheSettings = field(default_factory=TokenCacheSettings)
    timeout: Seconds = 0.2  # remote: bound on the whole call, retries included
    retry: RetrySettings = REMOTE_RETRY
    circuit_breaker: BreakerSettings = field(default_factory=BreakerSettings)
    min_chars_offload: int = 2048  # local: prompts this long are tokenized on a thread pool

    def __post_init__(self) -> None:
        if self.backend == "local":
            if not self.model_dir:
                raise FieldError("model_dir", "required when backend is 'local'")
            if not (Path(self.model_dir) / "tokenizer.json").is_file():
                raise FieldError("model_dir", f"no tokenizer.json in {self.model_dir!r}")
        if self.backend == "remote":
            if not self.endpoint or not self.endpoint.startswith(("http://", "https://")):
                raise FieldError(
                    "endpoint", f"required when backend is 'remote': an http(s) URL, got {self.endpoint!r}")
        if self.timeout <= 0:
            raise FieldError("timeout", f"must be > 0, got {self.timeout}")
        if self.min_chars_offload < 0:
            raise FieldError("min_chars_offload", f"must be >= 0, got {self.min_chars_offload}")


def _metric(registry: CollectorRegistry | None, kind: type[Any], name: str, doc: str,
            labels: list[str]) -> Any:
    """Get-or-create, so several tokenizer filters can share one registry."""
    if registry is not None:
        existing = registry._names_to_collectors.get(name)
        if existing is not None:
            return existing
    return kind(name, doc, labels, registry=registry)


class TokenizerMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.results = _metric(registry, Counter, "kvgate_tokenizer_results", "Prompts given token ids, by source",
                               ["filter", "source"])
        self.failures = _metric(registry, Counter, "kvgate_tokenizer_failures",
                                "Prompts left without token ids, by reason", ["filter", "reason"])
        self.seconds = _metric(registry, Histogram, "kvgate_tokenizer_seconds",
                               "Backend tokenize time (cache misses)", ["filter", "backend"])
        self.breaker = _metric(registry, Gauge, "kvgate_tokenizer_breaker_state",
                               "Remote tokenizer breaker: 0 closed, 1 half-open, 2 open", ["filter"])
        # Per request: children looked up once per (filter, source or backend).
        self.result = Children(self.results)
        self.second = Children(self.seconds)


@register("tokenizer")
class TokenizerFilter(Filter):
    Config = TokenizerConfig
    consumes = (PROMPT,)
    produces = (TOKENS,)
    config: TokenizerConfig

    def __init__(self, config: TokenizerConfig, name: str, services: Services) -> None:
        super().__init__(config, name, services)
        self.cache = TokenCache(config.cache.max_size, config.cache.ttl, max_bytes=config.cache.max_bytes)
        self.metrics = TokenizerMetrics(services.metrics)
        self.backend: TokenizerBackend | None = None

    async def start(self) -> None:
        cfg = self.config
        if cfg.backend == "local":
            assert cfg.model_dir is not None
            self.backend = LocalTokenizer.from_dir(cfg.model_dir, min_chars_offload=cfg.min_chars_offload)
            return
        assert cfg.endpoint is not None
        gauge = self.metrics.breaker.labels(self.name)
        gauge.set(0)
        breaker = cfg.circuit_breaker.build(f"tokenizer:{self.name}",
                                            on_change=lambda _, state: gauge.set(_BREAKER_VALUE[state]))
        self.backend = RemoteTokenizer(cfg.endpoint, self.services.http, timeout=cfg.timeout, retry=cfg.retry,
                                       breaker=breaker)

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.close()

    async def on_request(self, ctx: RequestContext) -> FilterResult:
        prompt = ctx.get(PROMPT)
        if prompt is None or self.backend is None:
            return CONTINUE
        first = prompt.first_prompt
        if prompt.kind == "completion" and isinstance(first, list):
            self._found(ctx, list(first), "request")
            return CONTINUE
        options = engine_options(ctx.json, prompt.kind)
        key = cache_key(prompt, options) if self.cache.enabled else None  # no key for a cache that is off
        cached = self.cache.get(key) if key is not None else None
        if cached is not None:
            self._found(ctx, cached, "cache")
            return CONTINUE
        started = time.perf_counter()
        try:
            ids = await self.backend.tokenize(prompt, options)
        except TokenizeFailed as exc:
            self._failed(ctx, exc.reason, str(exc))
            return CONTINUE
        except Exception as exc:  # never fail the request over a tokenizer bug
            log.exception("tokenizer %s: unexpected error", self.name)
            self._failed(ctx, "error", f"{type(exc).__name__}: {exc}")
            return CONTINUE
        self.metrics.second(self.name, self.backend.source).observe(time.perf_counter() - started)
        if key is not None:
            self.cache.put(key, ids)
        self._found(ctx, ids, self.backend.source)
        return CONTINUE

    def _found(self, ctx: RequestContext, ids: list[int], source: str) -> None:
        ctx[TOKENS] = Tokens(ids, source)
        self.metrics.result(self.name, source).inc()

    def _failed(self, ctx: RequestContext, reason: str, message: str) -> None:
        self.metrics.failures.labels(self.name, reason).inc()
        ctx.log_fields["tokenizer_error"] = reason
        log.debug("tokenizer %s: no token ids (%s): %s", self.name, reason, message)
