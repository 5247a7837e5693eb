"""Make the simulated cache visible to an LMCache controller.

`ChunkSink` is what the prefix cache calls when 256-token chunks become fully
cached or stop being so; once `reporting_ctx` has started a
`kvproto.worker.WorkerReporter`, the sink forwards to it (before that, and when no
controller is configured, reports go nowhere). `SimControlHandler` answers the
controller's pin/clear/compress/decompress/health by acting on the cache.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from kvproto.worker import WorkerReporter
from testbed.sim_vllm.cache import PrefixCache

LOCATION = "LocalCPUBackend"
COMPRESS_METHODS = frozenset({"cachegen", "zstd"})


class ChunkSink:
    """The cache's on_admit/on_evict callbacks; forwards to a reporter once one is attached."""

    def __init__(self) -> None:
        self.reporter: WorkerReporter | None = None

    def admit(self, keys: list[int]) -> None:
        if self.reporter is not None:
            self.reporter.admit(keys)

    def evict(self, keys: list[int]) -> None:
        if self.reporter is not None:
            self.reporter.evict(keys)


class SimControlHandler:
    """kvproto ControlHandler over the simulated prefix cache (one location: LocalCPUBackend)."""

    def __init__(self, cache: PrefixCache) -> None:
        self._cache = cache

    @staticmethod
    def _check(location: str, method: str | None = None) -> None:
        if location != LOCATION:
            raise ValueError(f"unknown location {location!r}; sim-vllm has only {LOCATION}")
        if method is not None and method not in COMPRESS_METHODS:
            raise ValueError(f"unsupported compression method {method!r}; use one of {sorted(COMPRESS_METHODS)}")

    async def pin(self, tokens: list[int], location: str) -> int:
        self._check(location)
        return self._cache.pin(tokens)

    async def clear(self, location: str) -> int:
        self._check(location)
        return self._cache.clear()

    async def compress(self, tokens: list[int] | None, method: str, location: str) -> int:
        self._check(location, method)
        return self._cache.set_compressed(tokens, True)

    async def decompress(self, tokens: list[int] | None, method: str, location: str) -> int:
        self._check(location, method)
        return self._cache.set_compressed(tokens, False)

    async def health(self) -> int:
        return 0


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    host: str
    ports: Mapping[str, int]
    heartbeat_interval: float = 2.0
    worker_ip: str = "127.0.0.1"
    worker_port: int = 0

    def __post_init__(self) -> None:
        missing = {"pull", "reply", "heartbeat"} - set(self.ports)
        if missing:
            raise ValueError(f"--lmcache-ports is missing {sorted(missing)}")


def reporting_ctx(config: ControllerConfig, instance_id: str, cache: PrefixCache,
                  sink: ChunkSink) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup_ctx entry owning the WorkerReporter for the app's lifetime."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        reporter = WorkerReporter(controller_host=config.host, ports=config.ports, instance_id=instance_id,
                                  handler=SimControlHandler(cache), location=LOCATION,
                                  heartbeat_interval=config.heartbeat_interval, ip=config.worker_ip,
                                  control_port=config.worker_port)
        await reporter.start()
        sink.reporter = reporter
        try:
            yield
        finally:
            sink.reporter = None
            await reporter.close()

    return ctx
