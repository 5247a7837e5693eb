"""One watcher per discovering cluster: ask the source every interval, hand changes
to `Generations.set_discovered` (a new config generation), keep the last known
endpoints when the source fails.

A failure is logged once when it starts (and again only if its message changes),
once when the source answers again; every failed round is counted
(`kvgate_discovery_errors_total`), every applied change too
(`kvgate_discovery_changes_total`). `/kvgate/status` shows each watcher's source,
endpoints, last answer, last change and last error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.discovery.config import DiscoveryConfig
from gateway.discovery.dns import DnsSource
from gateway.discovery.endpoints import DiscoveryError, Found
from gateway.discovery.file import FileSource
from gateway.metrics import GatewayMetrics
from gateway.reload import DiscoveryApplied, Generations
from kvkernel.decode import ConfigError

log = logging.getLogger("kvgate.discovery")


class Source(Protocol):
    async def find(self) -> Found: ...


def make_source(config: DiscoveryConfig) -> Source:
    if config.dns is not None:
        return DnsSource(config.dns, config.template)
    assert config.file is not None
    return FileSource(config.file, config.template)


@dataclass
class WatchStatus:
    source: str
    endpoints: list[str] = field(default_factory=list)  # ids, as last applied
    skipped: list[str] = field(default_factory=list)  # what the last answer left out, and why
    last_resolved_at: float | None = None  # Unix time of the last answer
    last_change_at: float | None = None
    last_error: str | None = None  # None while the source answers
    error_since: float | None = None
    changes: int = 0
    errors: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {"source": self.source, "endpoints": self.endpoints, "skipped": self.skipped,
                "last_resolved_at": _rounded(self.last_resolved_at), "last_change_at": _rounded(self.last_change_at),
                "last_error": self.last_error, "error_since": _rounded(self.error_since),
                "changes": self.changes, "errors": self.errors}


def _rounded(t: float | None) -> float | None:
    return round(t, 3) if t is not None else None


class ClusterWatch:
    def __init__(self, cluster: str, config: DiscoveryConfig, generations: Generations,
                 metrics: GatewayMetrics) -> None:
        self.cluster = cluster
        self.config = config
        self.source = make_source(config)
        self.status = WatchStatus(config.describe())
        self._generations = generations
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._applying: asyncio.Task[DiscoveryApplied | None] | None = None

    async def round(self) -> None:
        """Ask the source once and apply what changed; never raises (but cancellation)."""
        try:
            found = await self.source.find()
            # A swap is never cut in half: cancelling the watch waits for it (see `close`).
            self._applying = asyncio.ensure_future(
                self._generations.set_discovered(self.cluster, self.config, found.endpoints))
            applied = await asyncio.shield(self._applying)
        except (DiscoveryError, ConfigError) as exc:
            self._failed(str(exc))
            return
        except Exception as exc:  # a bug must not stop the watch: counted and shown like a failure
            log.exception("discovery of cluster %s failed unexpectedly", self.cluster)
            self._failed(f"{type(exc).__name__}: {exc}")
            return
        status, now = self.status, time.time()
        if status.last_error is not None:
            log.info("discovery of cluster %s answers again (%s)", self.cluster, status.source)
        status.last_resolved_at, status.last_error, status.error_since = now, None, None
        if applied is None:  # the config changed under this watcher: its successor reports
            return
        status.skipped = found.skipped + [f"{ep_id}: id already used by another endpoint" for ep_id in applied.skipped]
        status.endpoints = [ep.id for ep in found.endpoints if ep.id not in applied.skipped]
        if applied.changed:
            status.last_change_at = now
            status.changes += 1
            self._metrics.discovery_changes.labels(self.cluster).inc()
        self._metrics.discovered_endpoints.labels(self.cluster).set(len(status.endpoints))

    def _failed(self, message: str) -> None:
        status = self.status
        if status.last_error != message:
            log.warning("discovery of cluster %s failed, its last known %d endpoints stay: %s", self.cluster,
                        len(status.endpoints), message)
        if status.last_error is None:
            status.error_since = time.time()
        status.last_error = message
        status.errors += 1
        self._metrics.discovery_errors.labels(self.cluster).inc()

    def start(self, first_round: bool = True) -> None:
        self._task = asyncio.create_task(self._run(first_round), name=f"kvgate-discovery-{self.cluster}")

    async def _run(self, first_round: bool) -> None:
        if first_round:
            await self.round()
        while True:
            await asyncio.sleep(self.config.interval)
            await self.round()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._applying is not None:
            with contextlib.suppress(Exception):
                await self._applying


class Discovery:
    """The watchers of every discovering cluster; follows reloads."""

    def __init__(self, generations: Generations, metrics: GatewayMetrics) -> None:
        self._generations = generations
        self._metrics = metrics
        self.watches: dict[str, ClusterWatch] = {}
        generations.reload_listeners.append(self.reconfigure)

    async def start(self, config: GatewayConfig) -> None:
        """First round of every source at once (so the gateway starts with its endpoints
        known, each bounded by its source's timeout), then the periodic watch."""
        await self.reconfigure(config, await_first_round=True)

    async def reconfigure(self, config: GatewayConfig, await_first_round: bool = False) -> None:
        """Watch what `config` says: watchers whose `discovery:` changed (or went) stop, new
        ones start with an immediate round; the others go on undisturbed."""
        wanted = {c.name: c.discovery for c in config.clusters if c.discovery is not None}
        for name, watch in list(self.watches.items()):
            if wanted.get(name) != watch.config:
                await watch.close()
                del self.watches[name]
        fresh = [ClusterWatch(name, cfg, self._generations, self._metrics)
                 for name, cfg in wanted.items() if name not in self.watches]
        for watch in fresh:
            self.watches[watch.cluster] = watch
        if await_first_round:
            await asyncio.gather(*(w.round() for w in fresh))
        for watch in fresh:
            watch.start(first_round=not await_first_round)

    async def close(self) -> None:
        for watch in self.watches.values():
            await watch.close()
        self.watches.clear()

    def status(self) -> dict[str, Any]:
        return {name: watch.status.snapshot() for name, watch in self.watches.items()}


DISCOVERY_KEY = web.AppKey("kvgate_discovery", Discovery)
