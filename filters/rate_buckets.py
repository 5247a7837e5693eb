"""Token buckets for the `rate-limit` filter: the rule, an in-process store and a Redis store.

Two buckets per client: requests (capacity `burst`, refilled at `rate`/s; a request
needs one whole token) and LLM tokens (capacity `burst`, refilled at `rate`/s; a
request is admitted while the bucket is not in debt, then charged its prompt tokens,
and its completion tokens after the fact, so the level may go below zero and the
client waits until it is positive again). A request is admitted only if both
buckets admit it; nothing is taken from either otherwise.

The Redis store runs the same rule in one Lua script (refill + check + take,
atomic), with Redis' own clock, so every gateway replica shares one limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cachetools import LRUCache


@dataclass(frozen=True, slots=True)
class Bucket:
    rate: float  # tokens added per second
    burst: float  # capacity


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after: float = 0.0  # seconds until the request would be admitted
    limit: str = ""  # "requests" or "tokens" when refused


def refill(level: float, since: float, now: float, bucket: Bucket) -> float:
    return min(bucket.burst, level + max(0.0, now - since) * bucket.rate)


def decide(req_level: float, tok_level: float, requests: Bucket | None, tokens: Bucket | None,
           cost: int) -> Verdict:
    """Admit or refuse, given both buckets' refilled levels (no I/O, no state)."""
    if requests is not None and req_level < 1.0:
        return Verdict(False, (1.0 - req_level) / requests.rate, "requests")
    if tokens is not None and tok_level <= 0.0:
        # The bucket must climb just above zero again.
        return Verdict(False, (-tok_level) / tokens.rate + 1e-3, "tokens")
    return Verdict(True)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class BucketStore(Protocol):
    async def take(self, client: str, requests: Bucket | None, tokens: Bucket | None, cost: int) -> Verdict: ...
    async def charge(self, client: str, tokens: Bucket, cost: int) -> None: ...
    async def close(self) -> None: ...


class MemoryStore:
    """Buckets in this process (the least recently used clients beyond `max_clients` are
    forgotten, which refills them: bounded memory under many client IPs)."""

    def __init__(self, max_clients: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._req: LRUCache[str, tuple[float, float]] = LRUCache(max_clients)
        self._tok: LRUCache[str, tuple[float, float]] = LRUCache(max_clients)

    def _level(self, table: LRUCache[str, tuple[float, float]], client: str, bucket: Bucket, now: float) -> float:
        level, since = table.get(client, (bucket.burst, now))
        return refill(level, since, now, bucket)

    async def take(self, client: str, requests: Bucket | None, tokens: Bucket | None, cost: int) -> Verdict:
        now = self.clock()
        req = self._level(self._req, client, requests, now) if requests else 0.0
        tok = self._level(self._tok, client, tokens, now) if tokens else 0.0
        verdict = decide(req, tok, requests, tokens, cost)
        if verdict.allowed:
            if requests:
                self._req[client] = (req - 1.0, now)
            if tokens:
                self._tok[client] = (tok - cost, now)
        return verdict

    async def charge(self, client: str, tokens: Bucket, cost: int) -> None:
        now = self.clock()
        self._tok[client] = (self._level(self._tok, client, tokens, now) - cost, now)

    async def close(self) -> None:
        return None


# KEYS: requests bucket, tokens bucket. ARGV: req_rate, req_burst, tok_rate, tok_burst, cost
# (a rate of 0 disables that bucket). Returns {allowed 0/1, retry_after_ms, limit}.
TAKE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local function level(key, rate, burst)
  local v = redis.call('HMGET', key, 'l', 't')
  local l, s = tonumber(v[1]), tonumber(v[2])
  if l == nil then return burst end
  return math.min(burst, l + math.max(0, now - s) * rate)
end
local rr, rb, tr = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tb, cost = tonumber(ARGV[4]), tonumber(ARGV[5])
local req, tok = 0, 0
if rr > 0 then
  req = level(KEYS[1], rr, rb)
  if req < 1 then return {0, math.ceil((1 - req) / rr * 1000), 'requests'} end
end
if tr > 0 then
  tok = level(KEYS[2], tr, tb)
  if tok <= 0 then return {0, math.ceil(-tok / tr * 1000) + 1, 'tokens'} end
end
if rr > 0 then
  redis.call('HSET', KEYS[1], 'l', req - 1, 't', now)
  redis.call('PEXPIRE', KEYS[1], math.ceil(rb / rr * 1000) + 1000)
end
if tr > 0 then
  redis.call('HSET', KEYS[2], 'l', tok - cost, 't', now)
  redis.call('PEXPIRE', KEYS[2], math.ceil((tb + cost) / tr * 1000) + 1000)
end
return {1, 0, ''}
"""

# KEYS: tokens bucket. ARGV: rate, burst, cost. Charges after the fact (may go into debt).
CHARGE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'l', 't')
local l, s = tonumber(v[1]), tonumber(v[2])
if l == nil then l = burst else l = math.min(burst, l + math.max(0, now - s) * rate) end
l = l - cost
redis.call('HSET', KEYS[1], 'l', l, 't', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - l) / rate * 1000) + 1000)
return 1
"""


class RedisStore:
    """Buckets in Redis, shared by every replica that uses the same `url` and `prefix`.
    Callers bound each call with a timeout and decide what a failure means."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis.asyncio as aioredis  # optional dependency: imported only when used

        self.client: Any = aioredis.from_url(url, socket_connect_timeout=1.0, decode_responses=True)
        self.prefix = prefix
        self._take = self.client.register_script(TAKE_LUA)
        self._charge = self.client.register_script(CHARGE_LUA)

    async def take(self, client: str, requests: Bucket | None, tokens: Bucket | None, cost: int) -> Verdict:
        keys = [f"{self.prefix}{client}:req", f"{self.prefix}{client}:tok"]
        args = [requests.rate if requests else 0, requests.burst if requests else 0,
                tokens.rate if tokens else 0, tokens.burst if tokens else 0, cost]
        allowed, retry_ms, limit = await self._take(keys=keys, args=args)
        return Verdict(bool(allowed), int(retry_ms) / 1000.0, str(limit))

    async def charge(self, client: str, tokens: Bucket, cost: int) -> None:
        await self._charge(keys=[f"{self.prefix}{client}:tok"], args=[tokens.rate, tokens.burst, cost])

    async def close(self) -> None:
        await self.client.aclose()
