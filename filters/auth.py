"""`auth` filter: API keys, hashed at rest, checked in constant time.

Keys come from a file (`keys_file`) or an environment variable (`keys_env`), never
from the YAML itself. Each entry is `id:sha256-hex[:model,model...]`, one per line
(in the variable, entries may also be separated by `;`); `kvgate hash-key` prints one
from a key read on stdin. A request presents its key as `Authorization: Bearer KEY`
or `x-api-key: KEY`; the key's SHA-256 is compared with every entry's hash by
`hmac.compare_digest`, so neither the match nor its position leaks through timing.

Writes `API_KEY_ID` (the entry's id, never the key) for `rate-limit`, the access log
(`api_key_id`) and the `kvgate_api_key_requests_total{api_key_id,status}` counter.

Per-key models: an entry that lists models may only ask for those (403 naming the
model). The filter reads the body's `model` from the parsed body (`ctx.json`, the
same field `prompt` reads), so it runs first in the chain and needs nothing from
another filter; a request without a `model` field is not restricted.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from filters.base import CONTINUE, Action, Filter, FilterResult, LocalReply
from filters.keys import API_KEY_ID
from filters.registry import register
from kvkernel.context import RequestContext
from kvkernel.decode import FieldError
from kvkernel.errors import error_body

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_COUNTERS: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    digest: bytes  # sha256 of the key
    models: frozenset[str] | None  # None: any model


def hash_key(key: str) -> str:
    """The hex SHA-256 stored for `key` (what `kvgate hash-key` prints)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_keys(text: str, source: str) -> list[ApiKey]:
    """Parse `id:sha256-hex[:models]` entries (lines or `;`-separated; `#` comments).
    Raises ValueError naming the entry."""
    keys: list[ApiKey] = []
    seen: set[str] = set()
    entries = [e.strip() for line in text.splitlines() for e in line.split(";")]
    for n, entry in enumerate(e for e in entries if e and not e.startswith("#")):
        parts = entry.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"{source}: entry {n + 1}: expected id:sha256-hex[:models], got {len(parts)} fields")
        key_id, digest = parts[0].strip(), parts[1].strip().lower()
        if not _ID.match(key_id):
            raise ValueError(f"{source}: entry {n + 1}: id {key_id!r} must be 1-64 of [A-Za-z0-9._-]")
        if not _HEX64.match(digest):
            raise ValueError(f"{source}: entry {n + 1} ({key_id}): the hash must be 64 hex digits "
                             "(use `kvgate hash-key`; the key itself never goes in this file)")
        if key_id in seen:
            raise ValueError(f"{source}: entry {n + 1}: id {key_id!r} used twice")
        seen.add(key_id)
        models = frozenset(m.strip() for m in parts[2].split(",") if m.strip()) if len(parts) == 3 else None
        keys.append(ApiKey(key_id, bytes.fromhex(digest), models or None))
    if not keys:
        raise ValueError(f"{source}: no keys")
    return keys


@dataclass(frozen=True, slots=True)
class AuthConfig:
    keys_file: str | None = None  # a file of id:sha256-hex[:models] lines
    keys_env: str | None = None  # an environment variable holding the same entries
    log_key_id: bool = True  # add `api_key_id` to the access log

    def __post_init__(self) -> None:
        if (self.keys_file is None) == (self.keys_env is None):
            raise FieldError("keys_file", "give exactly one of `keys_file` or `keys_env`")
        try:
            self.load()
        except ValueError as exc:
            raise FieldError("keys_file" if self.keys_file is not None else "keys_env", str(exc)) from None

    def load(self) -> list[ApiKey]:
        """Read and parse the keys (at config check and at each start: a reload re-reads them)."""
        if self.keys_file is not None:
            try:
                text = Path(self.keys_file).read_text()
            except OSError as exc:
                raise ValueError(f"cannot read {self.keys_file}: {exc.strerror}") from None
            return parse_keys(text, self.keys_file)
        assert self.keys_env is not None
        env = os.environ.get(self.keys_env)
        if env is None:
            raise ValueError(f"environment variable {self.keys_env} is not set")
        return parse_keys(env, f"${self.keys_env}")


def presented_key(headers: Any) -> str | None:
    """The key from `Authorization: Bearer KEY`, else `x-api-key`."""
    auth = headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return str(value.strip())
    key = headers.get("x-api-key", "").strip()
    return str(key) if key else None


def find_key(keys: list[ApiKey], presented: str) -> ApiKey | None:
    """The entry whose hash matches; every entry is compared (constant time, no early exit)."""
    digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
    found: ApiKey | None = None
    for key in keys:
        if hmac.compare_digest(digest, key.digest):
            found = key
    return found


def _reply(status: int, message: str, code: str, param: str | None = None) -> FilterResult:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    body = error_body(status, message, code=code, param=param, type_="invalid_request_error")
    return FilterResult(Action.STOP, LocalReply(status, body, headers, error=message))


def _counter(registry: CollectorRegistry | None) -> Counter | None:
    if registry is None:
        return None
    found = _COUNTERS.get(registry)
    if found is None:
        found = _COUNTERS[registry] = Counter("kvgate_api_key_requests", "Requests by API key id and status",
                                              ["api_key_id", "status"], registry=registry)
    return found


@register("auth")
class AuthFilter(Filter):
    Config = AuthConfig
    produces = (API_KEY_ID,)
    restart_on_reload = True  # a reload re-reads the keys (rotation without a restart)
    config: AuthConfig

    keys: list[ApiKey]
    counter: Counter | None = None

    async def start(self) -> None:
        self.keys = self.config.load()
        self.counter = _counter(self.services.metrics)

    async def on_request(self, ctx: RequestContext) -> FilterResult:
        presented = presented_key(ctx.headers)
        if presented is None:
            return _reply(401, "missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                          "invalid_api_key")
        key = find_key(self.keys, presented)
        if key is None:
            return _reply(401, "invalid API key", "invalid_api_key")
        ctx[API_KEY_ID] = key.id
        model = (ctx.json or {}).get("model")
        if key.models is not None and isinstance(model, str) and model not in key.models:
            return _reply(403, f"API key '{key.id}' may not use model '{model}'", "model_not_allowed", "model")
        return CONTINUE

    async def on_complete(self, ctx: RequestContext) -> None:
        key_id = ctx.get(API_KEY_ID)
        if self.config.log_key_id:
            ctx.log_fields["api_key_id"] = key_id
        if self.counter is not None:
            self.counter.labels(key_id or "-", str(ctx.status or 0)).inc()


def hash_key_main(argv: Sequence[str]) -> int:
    """`kvgate hash-key [ID [MODELS]]`: read a key on stdin, print its keys-file entry."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="kvgate hash-key",
                                     description="Read an API key on stdin; print its `auth` keys-file entry.")
    parser.add_argument("id", nargs="?", help="the key's id (logged and used as a metrics label)")
    parser.add_argument("--models", default="", help="comma-separated models this key may use")
    args = parser.parse_args(argv)
    key = sys.stdin.readline().strip()
    if not key:
        print("kvgate hash-key: no key on stdin", file=sys.stderr)
        return 1
    if args.id is None:
        print(hash_key(key))
        return 0
    if not _ID.match(args.id):
        print("kvgate hash-key: the id must be 1-64 of [A-Za-z0-9._-]", file=sys.stderr)
        return 1
    print(f"{args.id}:{hash_key(key)}" + (f":{args.models}" if args.models else ""))
    return 0
