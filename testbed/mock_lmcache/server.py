"""Run the mock controller in-process: ZMQ monitor sockets, HTTP API, optional admin listener."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web

from kvproto.chunks import CHUNK_SIZE
from testbed.mock_lmcache.app import MockController, make_admin_app, make_app
from testbed.mock_lmcache.faults import FaultInjector, Faults
from testbed.mock_lmcache.state import Registry
from testbed.mock_lmcache.zmq_side import ZmqFrontend

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MockConfig:
    host: str = "127.0.0.1"
    port: int = 9000
    monitor_ports: Mapping[str, int] = field(
        default_factory=lambda: {"pull": 9001, "reply": 9002, "heartbeat": 9003}
    )
    admin_port: int | None = None
    worker_call_timeout: float = 10.0
    health_check_interval: float = -1.0  # > 0: expire workers silent for worker_timeout seconds
    worker_timeout: float = 300.0
    chunk_size: int = CHUNK_SIZE
    worker_list_ttl: float = 30.0
    evict_enabled: bool = True
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        missing = {"pull", "reply"} - set(self.monitor_ports)
        if missing:
            raise ValueError(f"monitor_ports: missing {sorted(missing)}")
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size: must be > 0, got {self.chunk_size}")
        if self.worker_call_timeout <= 0:
            raise ValueError(f"worker_call_timeout: must be > 0, got {self.worker_call_timeout}")


class MockServer:
    """Owns every resource of one mock controller; `close()` releases them all."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.registry = Registry(
            chunk_size=config.chunk_size, worker_list_ttl=config.worker_list_ttl
        )
        self.zmq = ZmqFrontend(self.registry, config.host, config.monitor_ports,
                               config.worker_call_timeout)  # fmt: skip
        self.faults = FaultInjector(config.faults, self._set_down, self.registry.set_stale)
        self.controller = MockController(self.registry, self.zmq, self.faults,
                                         evict_enabled=config.evict_enabled)  # fmt: skip
        self.port = config.port
        self._runner = web.AppRunner(make_app(self.controller), handle_signals=False)
        self._admin_runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._expiry: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.zmq.start()
        await self._runner.setup()
        await self._set_down(False)
        if self.config.admin_port is not None:
            self._admin_runner = web.AppRunner(
                make_admin_app(self.controller), handle_signals=False
            )
            await self._admin_runner.setup()
            await web.TCPSite(self._admin_runner, self.config.host, self.config.admin_port).start()
        await self.faults.start()
        if self.config.health_check_interval > 0:
            self._expiry = asyncio.create_task(self._expire_loop())

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        await self.faults.apply({"hang": False})  # release held requests before shutdown
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        await self._runner.cleanup()
        await self.zmq.close()

    async def _set_down(self, down: bool) -> None:
        """down: close the API listener (connections refused); up: listen again on the same port."""
        if down and self._site is not None:
            await self._site.stop()
            self._site = None
        elif not down and self._site is None:
            self._site = web.TCPSite(self._runner, self.config.host, self.port)
            await self._site.start()
            self.port = int(self._runner.addresses[0][1])  # the bound port if started with 0

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_check_interval)
            dead = self.zmq.expire_workers(self.config.worker_timeout)
            if dead:
                log.warning("deregistered %d workers without heartbeat", dead)
