"""Hot reload: the exchange's routes, clusters, pickers and chain as one swappable generation.

A `Generation` bundles what a request needs from the config: a per-generation view of
the gateway state (routes, clusters, pickers; the shared singletons — prefix index,
clients, background queue, metrics — are the same objects), the filter chain and the
`Exchange` built on them. Each request takes the current generation when it starts
and finishes on it, whatever is reloaded meanwhile.

`Generations.reload()` (SIGHUP, `POST /admin/reload`) re-reads the config file and
plans it; an invalid config is rejected with its YAML-path error and nothing changes.
A valid one becomes a new generation that keeps what still applies:

- an endpoint whose config (and cluster breaker config) is unchanged is the same
  `Endpoint` object: health, breaker, load and statistics carry over;
- a cluster whose picker type and config are unchanged keeps its picker (learned state);
- a filter whose type, name and config are unchanged is the same started instance,
  unless its class sets `restart_on_reload` (e.g. `auth`, which re-reads its keys);
- the prefix index, the KV-event feed, clients and the background queue are never rebuilt;
  the feed follows the new endpoint set (`KVEventFeed.sync`).

An endpoint that is gone from the new generation drains (`gateway.fleet`): no new
request goes there, the ones in flight finish, then it leaves the prefix index and
its KV-event subscription closes.

Endpoint discovery (`gateway.discovery`) rides on the same swap: `set_discovered`
replaces one cluster's discovered endpoints in a new generation (every filter kept),
serialised with reloads by one lock. `static` is the config as written; a reload
keeps the discovered endpoints of every cluster that still has a `discovery:` block.

New filters start before the swap; the old generation's filters that are not carried
over close once its last in-flight request is done. `server:` settings other than
those read per request are not applied live: the answer lists them under
`restart_needed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from filters.base import Filter, Services
from filters.runner import FilterChain
from gateway.admission import AdmissionGate
from gateway.config import GatewayConfig, load_config
from gateway.discovery.config import DiscoveryConfig
from gateway.discovery.endpoints import merge_discovered
from gateway.endpoint_config import EndpointConfig
from gateway.endpoints import ClusterRegistry
from gateway.exchange import Exchange
from gateway.fleet import DrainingEndpoints, carry_over_clusters
from gateway.monitor import EndpointMonitor
from gateway.pickers.base import Picker
from gateway.plan import GatewayPlan, plan_gateway
from gateway.proxy import Proxy
from gateway.routes import RouteTable
from gateway.state import GatewayState
from kvkernel.decode import ConfigError

T = TypeVar("T")

log = logging.getLogger("kvgate.reload")

# Read per request from the generation's config: these apply on reload.
_LIVE_SERVER_FIELDS = frozenset({"debug_headers"})


@dataclass(eq=False)
class Generation:
    number: int
    plan: GatewayPlan
    state: GatewayState  # this generation's view; `inflight` counts its own requests
    chain: FilterChain
    exchange: Exchange
    retired: bool = False
    closed: bool = False


@dataclass(frozen=True, slots=True)
class DiscoveryApplied:
    changed: bool  # a new generation was made
    skipped: list[str]  # discovered ids left out: another endpoint already uses them


class ReloadError(Exception):
    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.message, self.path = message, path


@dataclass(eq=False)
class Generations:
    """The current generation, the retired ones still serving requests, and the reload."""

    root: GatewayState  # app-wide: shared singletons, the current view for status/metrics
    config_path: str | None = None
    monitor_enabled: bool = True
    current: Generation | None = None
    retired: list[Generation] = field(default_factory=list)
    monitor: EndpointMonitor | None = None
    gate: AdmissionGate | None = None
    static: GatewayConfig | None = None  # the config as written, without discovered endpoints
    discovered: dict[str, list[EndpointConfig]] = field(default_factory=dict)  # cluster -> last known
    draining: DrainingEndpoints = field(default_factory=DrainingEndpoints)
    # Called after a reload with the new (static) config, outside the lock: discovery restarts its watchers.
    reload_listeners: list[Callable[[GatewayConfig], Awaitable[None]]] = field(default_factory=list)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _drain_scheduled: bool = False
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def services(self, clusters: ClusterRegistry) -> Services:
        root = self.root
        assert root.http is not None and root.background is not None
        return Services(clusters=clusters, background=root.background, http=root.http,
                        metrics=root.metrics.registry, gateway_load=root.load, prefix_index=root.prefix_index,
                        session=root.session)

    async def start(self, plan: GatewayPlan) -> None:
        """Build and start the first generation from the root state's clusters and pickers."""
        root = self.root
        services = self.services(root.clusters)
        filters = [p.cls(p.config, p.name, services) for p in plan.filters]
        chain = FilterChain(filters)
        await chain.start()
        self.current = self._generation(0, plan, root.clusters, root.pickers, chain)
        self.static = plan.config

    def _generation(self, number: int, plan: GatewayPlan, clusters: ClusterRegistry,
                    pickers: dict[str, Picker], chain: FilterChain) -> Generation:
        root = self.root
        config = plan.config
        routes = RouteTable(config.routes)
        view = dataclasses.replace(root, config=config, clusters=clusters, pickers=pickers, routes=routes,
                                   inflight=0, draining=root.draining)
        assert root.session is not None
        if self.gate is None:  # one gate for the process: in-flight counts span reloads
            self.gate = AdmissionGate(config.server.limits)
        exchange = Exchange(view, chain, Proxy(root.session, config.server.debug_headers), self.gate)
        return Generation(number, plan, view, chain, exchange)

    def acquire(self) -> Generation:
        """The generation a new request runs on (counted in the root's in-flight total)."""
        gen = self.current
        assert gen is not None, "the gateway has not started"
        gen.state.draining = self.root.draining
        self.root.inflight += 1
        return gen

    def release(self, gen: Generation) -> None:
        self.root.inflight -= 1
        if gen.retired and gen.state.inflight == 0 and not gen.closed:
            self._spawn(self._close(gen))
        if self.draining:
            self._check_drained()

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and swap generations; ReloadError leaves everything as it was.
        The reload runs to its end in a task of its own: a caller that is cancelled (the
        admin client went away) stops waiting for it but does not stop it half-way."""
        task = self._spawn(self._reload())
        task.add_done_callback(_seen)
        return await asyncio.shield(task)

    async def _reload(self) -> dict[str, Any]:
        async with self._lock:
            if self.config_path is None:
                raise ReloadError("this gateway was not started from a config file; nothing to reload")
            try:
                config = await asyncio.to_thread(load_config, self.config_path)
                discovered = {c.name: self.discovered[c.name] for c in config.clusters
                              if c.discovery is not None and c.name in self.discovered}
                plan = plan_gateway(merge_discovered(config, discovered)[0])
            except ConfigError as exc:
                log.error("reload of %s rejected, the running config stays: %s", self.config_path, exc)
                raise ReloadError(str(exc), exc.path) from None
            old, gen, fresh = await self._swap(plan, unproven=_unproven(config, discovered))
            self.static, self.discovered = config, discovered
        for listener in self.reload_listeners:
            await listener(config)
        restart = _restart_needed(old.plan.config, plan.config)
        log.info("config reloaded: generation %d (%d clusters, filters: %s)%s", gen.number, len(plan.config.clusters),
                 ", ".join(f.name for f in gen.chain.filters) or "none",
                 f"; needs a restart to apply: {', '.join(restart)}" if restart else "")
        kept = set(old.state.clusters.all_endpoints())
        return {"generation": gen.number, "restart_needed": restart,
                "endpoints_kept": sorted(e.id for e in gen.state.clusters.all_endpoints() if e in kept),
                "filters_started": [f.name for f in fresh]}

    async def set_discovered(self, cluster: str, source: DiscoveryConfig,
                             endpoints: list[EndpointConfig]) -> DiscoveryApplied | None:
        """Make `endpoints` the discovered endpoints of `cluster` (found by a watcher of
        `source`), in a new generation if they changed. None when the running config no
        longer discovers this cluster that way (a stale watcher). ConfigError if the
        result is invalid."""
        async with self._lock:
            static, old = self.static, self.current
            assert static is not None and old is not None
            config = next((c for c in static.clusters if c.name == cluster), None)
            if config is None or config.discovery != source:
                return None
            discovered = {**self.discovered, cluster: endpoints}
            merged, skipped = merge_discovered(static, discovered)
            if self.discovered.get(cluster) == endpoints:
                return DiscoveryApplied(False, skipped.get(cluster, []))
            plan = plan_gateway(merged, old.plan.filters)
            _, gen, _ = await self._swap(plan, restart_filters=False, unproven=_unproven(static, discovered))
            self.discovered = discovered
            log.info("discovery: cluster %s now has %d endpoints (generation %d)", cluster,
                     len(gen.state.clusters[cluster].endpoints), gen.number)
            return DiscoveryApplied(True, skipped.get(cluster, []))

    async def _swap(self, plan: GatewayPlan, *, restart_filters: bool = True,
                    unproven: Collection[str] = ()) -> tuple[Generation, Generation, list[Filter]]:
        """Make `plan` current; returns (old generation, new generation, filters started).
        `restart_filters=False` keeps every unchanged filter, even those that restart on
        reload; `unproven`: endpoint ids that start unhealthy when new (discovered ones)."""
        old = self.current
        assert old is not None
        clusters = carry_over_clusters(old.state.clusters, plan.config.clusters, self.draining.previous(), unproven)
        pickers = {name: _kept_picker(old, name, p) or p.build() for name, p in plan.pickers.items()}
        services = self.services(clusters)
        kept = {(type(f), f.name, _config_key(f.config)): f for f in old.chain.filters
                if not (restart_filters and f.restart_on_reload)}
        filters: list[Filter] = []
        fresh: list[Filter] = []
        for p in plan.filters:
            found = kept.pop((p.cls, p.name, _config_key(p.config)), None)
            if found is None:
                found = p.cls(p.config, p.name, services)
                fresh.append(found)
            filters.append(found)
        try:
            await FilterChain(fresh).start()
        except Exception as exc:
            await FilterChain(fresh).close()
            log.exception("reload rejected: a new filter failed to start")
            raise ReloadError(f"a filter failed to start: {type(exc).__name__}: {exc}") from None
        for f in filters:
            f.services.clusters = clusters  # carried-over filters see the new clusters too
        gen = self._generation(old.number + 1, plan, clusters, pickers, FilterChain(filters))
        self.current = gen
        root = self.root
        root.config, root.clusters, root.pickers, root.routes = plan.config, clusters, pickers, gen.state.routes
        for ep_id in self.draining.update(old.state.clusters, clusters):
            log.info("endpoint %s left the fleet: draining its in-flight requests", ep_id)
        old.retired = True
        self.retired.append(old)
        if old.state.inflight == 0:
            await self._close(old)
        await self._sync_feed()
        self._restart_monitor()
        self._check_drained()
        return old, gen, fresh

    async def _sync_feed(self) -> None:
        """The KV-event feed follows the current endpoints and the draining ones."""
        if self.root.kv_feed is not None:
            await self.root.kv_feed.sync([*self.root.clusters.all_endpoints(), *self.draining.endpoints()])

    def _check_drained(self) -> None:
        if not self._drain_scheduled and self.draining.any_done():
            self._drain_scheduled = True
            self._spawn(self._finish_drained())

    async def _finish_drained(self) -> None:
        """Endpoints that left and have no request in flight leave the index and the feed."""
        async with self._lock:
            self._drain_scheduled = False
            done = self.draining.pop_done()
            if not done:
                return
            await self._sync_feed()
            root = self.root
            for endpoint in done:
                root.prefix_index.forget_endpoint(endpoint.id)
                root.metrics.forget_endpoint(endpoint.id)
                for picker in root.pickers.values():
                    picker.forget(endpoint.id)
                log.info("endpoint %s drained and removed", endpoint.id)

    async def _close(self, gen: Generation) -> None:
        """Close the retired generation's filters that the current one does not use."""
        if gen.closed:
            return
        gen.closed = True
        in_use = set(self.current.chain.filters) if self.current is not None else set()
        in_use |= {f for g in self.retired if not g.closed for f in g.chain.filters}
        await FilterChain([f for f in gen.chain.filters if f not in in_use]).close()
        if gen in self.retired:
            self.retired.remove(gen)

    async def close(self) -> None:
        """Shutdown: close every generation's filters (each once)."""
        for task in list(self._tasks):
            with contextlib.suppress(ReloadError):  # a reload's outcome went to its caller (or the log)
                await task
        closing = {f: None for g in [*self.retired, self.current] if g is not None for f in g.chain.filters}
        await FilterChain(list(closing)).close()

    def start_monitor(self, streaks: Mapping[str, int] | None = None) -> None:
        """Health checks and scrapes of the current endpoints, starting at once (a new
        endpoint is probed promptly); `streaks`: the previous monitor's, carried over."""
        if self.monitor_enabled:
            assert self.root.http is not None
            self.monitor = EndpointMonitor(list(self.root.clusters), self.root.http, streaks)
            self.monitor.start()

    async def close_monitor(self) -> None:
        if self.monitor is not None:
            await self.monitor.close()
            self.monitor = None

    def _restart_monitor(self) -> None:
        if self.monitor is None:
            return
        old = self.monitor
        self.monitor = None
        self._spawn(old.close())
        self.start_monitor(old.streaks)

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _seen(task: asyncio.Task[Any]) -> None:
    """Done-callback of a reload whose caller may have gone: a rejected config was logged
    already; anything else is logged here rather than lost."""
    if not task.cancelled() and (exc := task.exception()) is not None and not isinstance(exc, ReloadError):
        log.error("config reload failed: %s: %s", type(exc).__name__, exc, exc_info=exc)


def _unproven(static: GatewayConfig, discovered: Mapping[str, Sequence[EndpointConfig]]) -> set[str]:
    """The ids of discovered endpoints (a static endpoint with the same id wins: not those)."""
    written = {ep.id for c in static.clusters for ep in c.endpoints}
    return {ep.id for eps in discovered.values() for ep in eps} - written


def _kept_picker(old: Generation, cluster: str, plan: Any) -> Picker | None:
    prior = old.plan.pickers.get(cluster)
    if prior is None or prior.cls is not plan.cls or _config_key(prior.config) != _config_key(plan.config):
        return None
    return old.state.pickers.get(cluster)


def _config_key(config: Any) -> str:
    return repr(config)  # frozen dataclasses of plain values: equal configs, equal reprs


def _restart_needed(old: GatewayConfig, new: GatewayConfig) -> list[str]:
    return [f"server.{f.name}" for f in dataclasses.fields(old.server)
            if f.name not in _LIVE_SERVER_FIELDS and getattr(old.server, f.name) != getattr(new.server, f.name)]



GENERATIONS_KEY = web.AppKey("kvgate_generations", Generations)
