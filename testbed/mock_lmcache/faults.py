"""Fault injection for the mock controller, settable at start (flags) and at run time (/admin/faults).

Faults apply to the LMCache API paths (every path not under `/admin`), optionally
narrowed by `paths` (path prefixes). Order per request: down, hang, latency, error.

- `latency_ms`: added delay before the request is handled.
- `error_rate`: probability of answering HTTP 500 `{"detail": "injected fault"}`,
  drawn from a `random.Random(seed)` so a run is reproducible.
- `hang`: the request is held without an answer until `hang` is turned off, then
  served normally.
- `down`: the HTTP listener is closed, so new connections are refused
  (ECONNREFUSED); a request arriving on an already-open keep-alive connection has
  its connection aborted (reset) without a response. The admin listener
  (`--admin-port`) stays up to turn it off; `down_for_s` restores it by itself.
- `stale`: the index keeps reporting chunks that workers evicted while it is on.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Faults:
    latency_ms: float = 0.0
    error_rate: float = 0.0
    hang: bool = False
    down: bool = False
    stale: bool = False
    paths: list[str] = field(default_factory=list)  # empty = every API path
    seed: int = 0
    down_for_s: float = 0.0  # > 0 with down=True: come back up after this many seconds

    def __post_init__(self) -> None:
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms: must be >= 0, got {self.latency_ms}")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate: must be within [0, 1], got {self.error_rate}")
        if self.down_for_s < 0:
            raise ValueError(f"down_for_s: must be >= 0, got {self.down_for_s}")
        if not all(isinstance(p, str) and p.startswith("/") for p in self.paths):
            raise ValueError(
                f"paths: must be a list of path prefixes starting with '/', got {self.paths}"
            )


_TYPES: dict[str, tuple[type, ...]] = {
    "latency_ms": (int, float), "error_rate": (int, float), "hang": (bool,), "down": (bool,),
    "stale": (bool,), "paths": (list,), "seed": (int,), "down_for_s": (int, float),
}  # fmt: skip


def updated(current: Faults, changes: Mapping[str, Any]) -> Faults:
    """`current` with `changes` applied; ValueError names the offending key."""
    for key, value in changes.items():
        if key not in _TYPES:
            raise ValueError(f"{key}: unknown fault (known: {', '.join(_TYPES)})")
        bad_bool = isinstance(value, bool) and bool not in _TYPES[key]
        if bad_bool or not isinstance(value, _TYPES[key]):
            raise ValueError(
                f"{key}: expected {'/'.join(t.__name__ for t in _TYPES[key])}, got {value!r}"
            )
    return Faults(**{**asdict(current), **changes})


class FaultInjector:
    """Holds the active faults, applies them as aiohttp middleware, and counts what it injected."""

    def __init__(
        self,
        faults: Faults,
        on_down: Callable[[bool], Awaitable[None]] | None = None,
        on_stale: Callable[[bool], None] | None = None,
    ) -> None:
        self.faults = Faults()
        self.counters: dict[str, int] = dict.fromkeys(("delayed", "errors", "hung", "aborted"), 0)
        self._on_down = on_down
        self._on_stale = on_stale
        self._rng = random.Random(0)
        self._unhang = asyncio.Event()
        self._restore: asyncio.TimerHandle | None = None
        self._initial = faults

    async def start(self) -> None:
        """Apply the start-up faults (needs the running loop and listeners)."""
        await self.apply(asdict(self._initial))

    async def apply(self, changes: Mapping[str, Any]) -> Faults:
        """Validate and apply a partial update; return the new fault set."""
        old, new = self.faults, updated(self.faults, changes)
        self.faults = new
        if "seed" in changes or new.seed != old.seed:
            self._rng = random.Random(new.seed)
        if new.hang:
            self._unhang.clear()
        else:
            self._unhang.set()
        if new.stale != old.stale and self._on_stale is not None:
            self._on_stale(new.stale)
        if new.down != old.down and self._on_down is not None:
            await self._on_down(new.down)
        self._schedule_restore(new)
        return new

    def _schedule_restore(self, faults: Faults) -> None:
        if self._restore is not None:
            self._restore.cancel()
            self._restore = None
        if faults.down and faults.down_for_s > 0:
            loop = asyncio.get_running_loop()
            self._restore = loop.call_later(
                faults.down_for_s,
                lambda: asyncio.ensure_future(self.apply({"down": False, "down_for_s": 0.0})),
            )

    def applies_to(self, path: str) -> bool:
        if path.startswith("/admin"):
            return False
        return not self.faults.paths or any(path.startswith(p) for p in self.faults.paths)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.applies_to(request.path):
            return await handler(request)
        faults = self.faults
        if faults.down:
            self.counters["aborted"] += 1
            if request.transport is not None:
                request.transport.abort()
            raise web.HTTPServiceUnavailable()  # never reaches the (aborted) client
        if faults.hang:
            self.counters["hung"] += 1
            await self._unhang.wait()
        if faults.latency_ms > 0:
            self.counters["delayed"] += 1
            await asyncio.sleep(faults.latency_ms / 1000)
        if faults.error_rate > 0 and self._rng.random() < faults.error_rate:
            self.counters["errors"] += 1
            return web.json_response({"detail": "injected fault"}, status=500)
        return await handler(request)
