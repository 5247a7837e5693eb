"""An async client for the LMCache controller's HTTP API (wire formats: DESIGN.md).

One client per controller, one circuit breaker per client (the controller is one
dependency: every call, lookup or management, feeds the same breaker). Retries,
breaker accounting and time budgets follow `kvkernel.resilience`:

- `CircuitOpenError` (from `kvkernel.breaker`): the breaker is open; nothing was sent;
- `LMCacheUnavailable`: connect error / timeout / HTTP 5xx on every attempt, or the
  call's time budget ran out (the breaker counts one failure per such call);
- `LMCacheRequestError`: a 4xx answer (never retried; counts as the controller
  being up);
- `LMCacheResponseError`: a 2xx answer whose body is not what the API promises.

`asyncio.CancelledError` always propagates unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import httpx

from kvkernel.breaker import CircuitBreaker, CircuitOpenError
from kvkernel.resilience import DEFAULT_RETRY, DependencyDown, ResilientCaller, RetrySettings

__all__ = ["CircuitOpenError", "LMCacheClient", "LMCacheError", "LMCacheRequestError", "LMCacheResponseError",
           "LMCacheUnavailable", "LookupResult", "RetrySettings", "parse_layout"]

EvictOutcome = Literal["evicted", "cleared", "skipped"]
# Older controllers and docs give layout entries as objects; these keys carry the prefix end.
_COUNT_KEYS = ("num_tokens", "n", "matched_tokens", "matched_prefix_length", "prefix_len", "token_count", "count")


class LMCacheError(Exception):
    """Base of every error the client raises (besides CircuitOpenError)."""


class LMCacheUnavailable(LMCacheError):
    """Connect error, timeout or HTTP 5xx after retries, or the time budget ran out."""


class LMCacheRequestError(LMCacheError):
    """The controller answered 4xx: the request is wrong or the endpoint does not exist."""

    def __init__(self, path: str, status: int, detail: str) -> None:
        super().__init__(f"lmcache {path}: HTTP {status}: {detail}")
        self.path = path
        self.status = status
        self.detail = detail


class LMCacheResponseError(LMCacheError):
    """A 2xx answer that does not match the API's response shape."""


@dataclass(frozen=True, slots=True)
class LookupResult:
    """`/lookup`'s answer: instance_id -> (location, matched prefix tokens)."""

    event_id: str | None
    layout: dict[str, tuple[str, int]]


_JSON = {"Content-Type": "application/json"}


async def _aiohttp_post(session: aiohttp.ClientSession, url: str, body: dict[str, Any], timeout: float) -> Any:
    """POST JSON through aiohttp, raising what httpx would: HTTPStatusError for a non-2xx
    answer, ConnectError / ReadTimeout / ReadError for transport failures."""
    request = httpx.Request("POST", url)
    try:
        async with session.post(url, data=json.dumps(body, separators=(",", ":")), headers=_JSON,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            raw = await resp.read()
            status = resp.status
    except TimeoutError as exc:
        raise httpx.ReadTimeout(f"no answer within {timeout}s", request=request) from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc), request=request) from exc
    except aiohttp.ClientError as exc:
        raise httpx.ReadError(f"{type(exc).__name__}: {exc}", request=request) from exc
    if not 200 <= status < 300:
        response = httpx.Response(status, content=raw, request=request)
        response.raise_for_status()
    return json.loads(raw)


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or int(value) != value:
        raise LMCacheResponseError(f"{where}: expected a token count (integer >= 0), got {value!r}")
    return int(value)


def _layout_entry(instance_id: str, value: Any) -> tuple[str, int]:
    where = f"layout_info[{instance_id!r}]"
    if isinstance(value, list | tuple) and len(value) >= 2 and isinstance(value[0], str):
        return value[0], _count(value[1], where)
    if isinstance(value, Mapping):
        location = value.get("location", "")
        if not isinstance(location, str):
            raise LMCacheResponseError(f"{where}.location: expected a string, got {location!r}")
        for key in _COUNT_KEYS:
            if key in value:
                return location, _count(value[key], f"{where}.{key}")
        raise LMCacheResponseError(f"{where}: object without a token count ({'/'.join(_COUNT_KEYS)})")
    raise LMCacheResponseError(f"{where}: expected [location, n] or an object, got {value!r}")


def parse_layout(body: Mapping[str, Any]) -> LookupResult:
    """Parse a `/lookup` answer. Accepts `layout_info` values as `[location, n]`
    arrays and as objects (`{"location"?, "num_tokens" | "n" | ...}`), and the old
    flat form where instance entries sit beside `event_id` at the top level."""
    event_id = body.get("event_id")
    if "layout_info" in body:
        raw = body["layout_info"] or {}
    else:
        raw = {k: v for k, v in body.items() if k not in ("event_id", "res")}
    if not isinstance(raw, Mapping):
        raise LMCacheResponseError(f"layout_info: expected an object, got {raw!r}")
    layout = {str(inst): _layout_entry(str(inst), value) for inst, value in raw.items()}
    return LookupResult(event_id if isinstance(event_id, str) else None, layout)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, Mapping) and "detail" in body:
        return str(body["detail"])[:200]
    return str(body)[:200]


class LMCacheClient:
    """The controller's HTTP API. `http` is injected (pooled, owned by the app).

    Control calls that reach an instance's workers (pin, compress, decompress, clear,
    evict, move, health) are serialised per instance: the real controller (0.5.6)
    answers 500 to concurrent calls to one instance (its workers' REP sockets take one
    message at a time), so one is in flight per instance and the next waits its turn.
    Lookups and instance queries do not reach workers and are never held up."""

    def __init__(self, base_url: str, http: httpx.AsyncClient, *, request_timeout: float = 2.0,
                 retry: RetrySettings = DEFAULT_RETRY, breaker: CircuitBreaker | None = None,
                 evict_fallback: Literal["clear", "skip"] = "clear",
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 session: aiohttp.ClientSession | None = None) -> None:
        """`session`: send through this pooled aiohttp session instead of `http` (about a
        quarter of httpx's CPU per call; used on the request path). Errors are mapped to
        httpx's, so retries, the breaker and the error family behave the same."""
        self.base_url = base_url.rstrip("/")
        self._session = session
        self.breaker = breaker if breaker is not None else CircuitBreaker("lmcache")
        self.evict_fallback = evict_fallback
        self._http = http
        self._request_timeout = request_timeout
        self._caller = ResilientCaller(self.breaker, retry, sleep)
        self._instance_locks: dict[str, asyncio.Lock] = {}

    def _serialised(self, instance_id: str) -> asyncio.Lock:
        """The lock that keeps one control call in flight to `instance_id`."""
        lock = self._instance_locks.get(instance_id)
        if lock is None:
            lock = self._instance_locks[instance_id] = asyncio.Lock()
        return lock

    async def _control(self, instance_id: str, path: str, body: dict[str, Any]) -> int:
        async with self._serialised(instance_id):
            return await self._num_tokens(path, body)

    @property
    def retries(self) -> int:
        """Retried attempts so far (for metrics)."""
        return self._caller.retries

    async def _post(self, path: str, body: dict[str, Any], *, timeout: float | None = None,
                    retry: bool = True) -> dict[str, Any]:
        """One call: JSON in, JSON object out, errors mapped to the LMCacheError family."""
        url = self.base_url + path
        per_attempt = self._request_timeout if timeout is None else min(self._request_timeout, timeout)

        async def exchange() -> Any:
            if self._session is not None:
                return await _aiohttp_post(self._session, url, body, per_attempt)
            response = await self._http.post(url, json=body, timeout=per_attempt)
            response.raise_for_status()
            return response.json()

        try:
            result = await self._caller.call(exchange, timeout=timeout, retry=retry)
        except DependencyDown as exc:
            raise LMCacheUnavailable(f"lmcache {path}: {exc}") from exc
        except httpx.HTTPStatusError as exc:
            raise LMCacheRequestError(path, exc.response.status_code, _detail(exc.response)) from None
        except ValueError as exc:  # the body was not JSON
            raise LMCacheResponseError(f"lmcache {path}: invalid JSON: {exc}") from None
        except httpx.HTTPError as exc:  # not transient: bad URL, undecodable body, redirects
            raise LMCacheError(f"lmcache {path}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, dict):
            raise LMCacheResponseError(f"lmcache {path}: expected a JSON object, got {type(result).__name__}")
        return result

    async def _num_tokens(self, path: str, body: dict[str, Any]) -> int:
        answer = await self._post(path, body)
        if "num_tokens" not in answer:
            raise LMCacheResponseError(f"lmcache {path}: answer has no 'num_tokens': {answer!r}"[:300])
        return _count(answer["num_tokens"], f"lmcache {path}: num_tokens")

    async def lookup(self, tokens: Sequence[int], *, timeout: float | None = None,
                     retry: bool = True) -> LookupResult:
        """Where the longest cached prefix of `tokens` lives. `timeout` bounds the
        whole call including retries (the request path passes its lookup budget)."""
        answer = await self._post("/lookup", {"tokens": list(tokens)}, timeout=timeout, retry=retry)
        try:
            return parse_layout(answer)
        except LMCacheResponseError as exc:
            raise LMCacheResponseError(f"lmcache /lookup: {exc}") from None

    async def pin(self, instance_id: str, location: str, tokens: Sequence[int]) -> int:
        body = {"instance_id": instance_id, "location": location, "tokens": list(tokens)}
        return await self._control(instance_id, "/pin", body)

    async def compress(self, instance_id: str, method: str, location: str,
                       tokens: Sequence[int] | None = None) -> int:
        return await self._control(instance_id, "/compress", _codec_body(instance_id, method, location, tokens))

    async def decompress(self, instance_id: str, method: str, location: str,
                         tokens: Sequence[int] | None = None) -> int:
        return await self._control(instance_id, "/decompress", _codec_body(instance_id, method, location, tokens))

    async def clear(self, instance_id: str, location: str) -> int:
        """Drop everything `instance_id` holds at `location`."""
        return await self._control(instance_id, "/clear", {"instance_id": instance_id, "location": location})

    async def move(self, old_position: tuple[str, str], new_position: tuple[str, str],
                   tokens: Sequence[int] | None = None, should_copy: bool = False) -> int:
        """Move (or copy) KV between (instance_id, location) positions."""
        body: dict[str, Any] = {"old_position": list(old_position), "new_position": list(new_position),
                                "should_copy": should_copy}
        if tokens is not None:
            body["tokens"] = list(tokens)
        async with contextlib.AsyncExitStack() as held:
            for instance in sorted({old_position[0], new_position[0]}):  # a fixed order: no deadlock
                await held.enter_async_context(self._serialised(instance))
            return await self._num_tokens("/move", body)

    async def health(self, instance_id: str) -> dict[str, int]:
        """worker id -> error code (0 = healthy). An old single `error_code` maps to key "all"."""
        async with self._serialised(instance_id):
            answer = await self._post("/health", {"instance_id": instance_id})
        codes = answer.get("error_codes")
        if isinstance(codes, Mapping):
            return {str(k): _int(v, f"lmcache /health: error_codes[{k!r}]") for k, v in codes.items()}
        if "error_code" in answer:
            return {"all": _int(answer["error_code"], "lmcache /health: error_code")}
        raise LMCacheResponseError(f"lmcache /health: answer has no 'error_codes': {answer!r}"[:300])

    async def query_instance(self, ip: str) -> str | None:
        """The LMCache instance id registered from `ip`, or None if the answer names none."""
        answer = await self._post("/query_instance", {"event_id": f"QueryInst{uuid.uuid4().hex}", "ip": ip})
        res = answer.get("res")
        return res if isinstance(res, str) and res else None

    async def query_worker_info(self, instance_id: str = "all",
                                worker_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"instance_id": instance_id}
        if worker_ids is not None:
            body["worker_ids"] = list(worker_ids)
        answer = await self._post("/query_worker_info", body)
        infos = answer.get("worker_infos")
        if not isinstance(infos, list) or not all(isinstance(i, dict) for i in infos):
            raise LMCacheResponseError(f"lmcache /query_worker_info: expected a 'worker_infos' list: {answer!r}"[:300])
        return infos

    async def evict(self, instance_id: str, tokens: Sequence[int], location: str = "LocalCPUBackend") -> EvictOutcome:
        """Evict the KV of `tokens` from `instance_id`. Real LMCache has no `/evict`:
        on 404/405 fall back per `evict_fallback` — "clear" clears the whole
        `location` of the instance ("cleared"), "skip" does nothing ("skipped")."""
        body = {"instance_id": instance_id, "tokens": list(tokens), "location": location}
        try:
            async with self._serialised(instance_id):
                await self._post("/evict", body)
        except LMCacheRequestError as exc:
            if exc.status not in (404, 405):
                raise
            if self.evict_fallback == "skip":
                return "skipped"
            await self.clear(instance_id, location)
            return "cleared"
        return "evicted"


def _codec_body(instance_id: str, method: str, location: str, tokens: Sequence[int] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"instance_id": instance_id, "method": method, "location": location}
    if tokens is not None:
        body["tokens"] = list(tokens)
    return body


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LMCacheResponseError(f"{where}: expected an integer, got {value!r}")
    return value
