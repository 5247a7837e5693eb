"""`rate-limit` filter: token buckets per API key id (or per client IP without `auth`).

Limits requests per second and LLM tokens per minute (prompt + completion). Prompt
tokens are charged at request time when `TOKENS` is known (the filter sits after
`tokenizer`), otherwise after the fact from the backend's `usage.prompt_tokens`;
completion tokens are always charged after the fact (`ctx.usage`, in
`on_complete`). A refused request gets a 429 in OpenAI's shape with `Retry-After`
(whole seconds, rounded up).

`backend: memory` keeps the buckets in this process; `backend: redis` keeps them in
Redis (one atomic Lua script per check) so every replica shares one limit. When Redis
fails or is slower than `redis_timeout`, `on_redis_error: open` (default) admits the
request and `closed` refuses it with a 503; either way it is counted in
`kvgate_rate_limit_backend_errors_total` and never becomes a 500.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter

from filters.base import CONTINUE, Filter, FilterResult, stop
from filters.keys import API_KEY_ID, TOKENS
from filters.rate_buckets import (
    Bucket,
    BucketStore,
    MemoryStore,
    RedisStore,
    Verdict,
    retry_after_header,
)
from filters.registry import register
from kvkernel.context import RequestContext, StateKey
from kvkernel.decode import FieldError, Seconds

log = logging.getLogger("kvgate.rate_limit")
_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Counter]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class _Admitted:
    client: str
    prompt_charged: bool


# Private to this module: which client an admitted request was charged to.
_ADMITTED: StateKey[_Admitted] = StateKey("rate_limit_admitted", _Admitted)


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    requests_per_second: float | None = None
    burst_requests: int | None = None  # default: max(1, ceil(requests_per_second))
    tokens_per_minute: int | None = None
    burst_tokens: int | None = None  # default: tokens_per_minute
    backend: Literal["memory", "redis"] = "memory"
    url: str | None = None  # redis://host:port/db, for backend: redis
    prefix: str = "kvgate:rl:"  # Redis key prefix; replicas sharing a limit use the same one
    redis_timeout: Seconds = 0.05
    on_redis_error: Literal["open", "closed"] = "open"
    max_clients: int = 100_000  # memory backend: clients remembered (least recently used forgotten)

    def __post_init__(self) -> None:
        if self.requests_per_second is None and self.tokens_per_minute is None:
            raise FieldError("requests_per_second", "give requests_per_second and/or tokens_per_minute")
        for name in ("requests_per_second", "tokens_per_minute", "burst_requests", "burst_tokens",
                     "redis_timeout", "max_clients"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise FieldError(name, f"must be > 0, got {value}")
        if self.backend == "redis":
            if not self.url or not self.url.startswith(("redis://", "rediss://", "unix://")):
                raise FieldError("url", f"backend redis needs url: redis://HOST:PORT, got {self.url!r}")
            if importlib.util.find_spec("redis") is None:
                raise FieldError("backend", "the redis backend needs the 'redis' package "
                                            "(pip install 'kvgate[redis]')")
        elif self.url is not None:
            raise FieldError("url", "only used with backend: redis")

    def buckets(self) -> tuple[Bucket | None, Bucket | None]:
        requests = tokens = None
        if self.requests_per_second is not None:
            burst = self.burst_requests or max(1, -(-self.requests_per_second // 1))
            requests = Bucket(self.requests_per_second, float(burst))
        if self.tokens_per_minute is not None:
            tokens = Bucket(self.tokens_per_minute / 60.0, float(self.burst_tokens or self.tokens_per_minute))
        return requests, tokens


def _metrics(registry: CollectorRegistry | None) -> dict[str, Counter] | None:
    if registry is None:
        return None
    found = _METRICS.get(registry)
    if found is None:
        found = _METRICS[registry] = {
            "limited": Counter("kvgate_rate_limited", "Requests refused by rate-limit", ["filter", "limit"],
                               registry=registry),
            "errors": Counter("kvgate_rate_limit_backend_errors", "Rate-limit store failures (Redis down or slow)",
                              ["filter", "outcome"], registry=registry),
        }
    return found


def client_identity(ctx: RequestContext) -> str:
    """The API key id when `auth` accepted one, else the client's address."""
    key_id = ctx.get(API_KEY_ID)
    return f"key:{key_id}" if key_id else f"ip:{ctx.remote or '-'}"


@register("rate-limit")
class RateLimitFilter(Filter):
    Config = RateLimitConfig
    config: RateLimitConfig

    store: BucketStore
    metrics: dict[str, Counter] | None = None
    _warned_at: float = 0.0

    async def start(self) -> None:
        self.requests, self.tokens = self.config.buckets()
        self.metrics = _metrics(self.services.metrics)
        cfg = self.config
        if cfg.backend == "redis":
            assert cfg.url is not None
            self.store = RedisStore(cfg.url, f"{cfg.prefix}{self.name}:")
        else:
            self.store = MemoryStore(cfg.max_clients)

    async def close(self) -> None:
        await self.store.close()

    async def on_request(self, ctx: RequestContext) -> FilterResult:
        client = client_identity(ctx)
        tokens = ctx.get(TOKENS)
        cost = len(tokens.ids) if tokens is not None and self.tokens is not None else 0
        verdict = await self._bounded(self.store.take(client, self.requests, self.tokens, cost))
        if verdict is None:
            if self.config.on_redis_error == "closed":
                return stop(503, "rate limiter unavailable", code="rate_limiter_unavailable",
                            headers={"Retry-After": "1"})
            return CONTINUE
        if not verdict.allowed:
            self._count("limited", verdict.limit)
            return stop(429, f"rate limit exceeded ({verdict.limit}) for this API key or client; "
                             f"retry after {retry_after_header(verdict.retry_after)}s",
                        code="rate_limit_exceeded", headers={"Retry-After": retry_after_header(verdict.retry_after)})
        ctx[_ADMITTED] = _Admitted(client, prompt_charged=tokens is not None)
        return CONTINUE

    async def on_complete(self, ctx: RequestContext) -> None:
        admitted = ctx.get(_ADMITTED)
        if admitted is None or self.tokens is None:
            return
        usage = ctx.usage
        cost = (usage.completion_tokens or 0) + (0 if admitted.prompt_charged else usage.prompt_tokens or 0)
        if cost <= 0:
            return
        charge = self.store.charge(admitted.client, self.tokens, cost)
        if isinstance(self.store, MemoryStore):
            await charge
        elif not self.services.background.submit("rate-limit-charge", lambda: self._bounded(charge)):
            charge.close()

    async def _bounded(self, call: Any) -> Verdict | None:
        """The store's answer within `redis_timeout`, or None (counted) when it failed."""
        try:
            async with asyncio.timeout(self.config.redis_timeout):
                result: Verdict | None = await call
                return result
        except Exception as exc:  # noqa: BLE001 - any store failure degrades, never a 500
            self._count("errors", "closed" if self.config.on_redis_error == "closed" else "open")
            now = time.monotonic()
            if now - self._warned_at > 10.0:  # one line per 10 s, not one per request
                self._warned_at = now
                log.warning("rate-limit %s: store failed (%s: %s); failing %s (counted in "
                            "kvgate_rate_limit_backend_errors_total)", self.name, type(exc).__name__, exc,
                            self.config.on_redis_error)
            return None

    def _count(self, which: str, label: str) -> None:
        if self.metrics is not None:
            self.metrics[which].labels(self.name, label).inc()
