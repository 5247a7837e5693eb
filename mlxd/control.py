"""The LMCache controller's control messages, acting on the daemon's prefix cache.

`CacheControl` implements kvproto's `ControlHandler`. Every operation runs on the
engine thread (the cache's only owner). A location other than the daemon's holds
nothing, so operations on it affect 0 tokens. Compress/decompress without tokens
(or with an empty list, which is how the controller forwards an omitted field)
act on every entry. Compression methods: "zstd" (ours)
and "cachegen" (handled as zstd here). The real controller forwards any method: the
worker checks it, as this one does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from mlxd.engine import Engine
from mlxd.prefix_cache import PrefixCache

METHODS = frozenset({"zstd", "cachegen"})


class CacheControl:
    """kvproto ControlHandler over an `Engine`'s prefix cache."""

    def __init__(self, engine: Engine, location: str = "LocalCPUBackend") -> None:
        self.engine = engine
        self.location = location

    async def _on_cache(self, location: str, op: Callable[[PrefixCache], int]) -> int:
        if location != self.location:
            return 0

        def run(engine: Engine) -> int:
            return 0 if engine.cache is None else op(engine.cache)

        return int(await asyncio.wrap_future(self.engine.call(run)))

    @staticmethod
    def _check_method(method: str) -> None:
        if method not in METHODS:
            raise ValueError(f"unsupported compression method {method!r}; use one of {sorted(METHODS)}")

    async def pin(self, tokens: list[int], location: str) -> int:
        return await self._on_cache(location, lambda c: c.pin(tokens))

    async def clear(self, location: str) -> int:
        return await self._on_cache(location, lambda c: c.clear())

    async def compress(self, tokens: list[int] | None, method: str, location: str) -> int:
        self._check_method(method)
        return await self._on_cache(location, lambda c: c.compress(tokens or None))

    async def decompress(self, tokens: list[int] | None, method: str, location: str) -> int:
        self._check_method(method)
        return await self._on_cache(location, lambda c: c.decompress(tokens or None))

    async def health(self) -> int:
        return 0 if self.engine.ready.is_set() and self.engine.alive else 1


def make_reporter(engine: Engine, host: str, ports: dict[str, int], instance_id: str,
                  location: str, control_port: int = 0, ip: str = "127.0.0.1") -> Any:
    """A kvproto WorkerReporter for this daemon, already set as the engine's chunk listener.
    `ip` is where the REP control socket binds and what the controller is told to dial."""
    from kvproto.worker import WorkerReporter

    reporter = WorkerReporter(controller_host=host, ports=ports, instance_id=instance_id,
                              handler=CacheControl(engine, location), location=location,
                              control_port=control_port, ip=ip)
    engine.chunk_listener = reporter
    return reporter
