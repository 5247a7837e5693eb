"""Map LMCache instance ids (keys of `/lookup`'s `layout_info`) to endpoint ids.

Modes (the kvcache filter's `instance_map:`):
- `explicit` (default): each endpoint's `lmcache_instance_id`, which defaults to
  its `id` — so identity needs no configuration;
- `identity`: instance id == endpoint id, ignoring `lmcache_instance_id`;
- `query_instance`: ask the controller `/query_instance` with the endpoint URL's
  host (its IP addresses, IPv4 first, when it is a name), off the hot path, and
  cache the answer for `refresh` seconds. Endpoints
  with an explicit `lmcache_instance_id`, endpoints whose host is shared with
  another endpoint (the controller answers per IP, so it cannot tell them apart),
  and endpoints not resolved yet use the explicit/identity mapping.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal
from urllib.parse import urlsplit

from filters.base import EndpointView

log = logging.getLogger("kvgate.kvcache")

MapMode = Literal["explicit", "identity", "query_instance"]
RETRY_AFTER = 5.0  # seconds before a failed /query_instance is asked again
QueryInstance = Callable[[str], Awaitable[str | None]]


def endpoint_host(url: str) -> str:
    return urlsplit(url).hostname or ""


class InstanceMap:
    """Resolves instance ids for the endpoints of one or more clusters."""

    def __init__(self, mode: MapMode = "explicit", *, query: QueryInstance | None = None,
                 all_endpoints: Sequence[EndpointView] = (), refresh: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`all_endpoints`: every endpoint of every cluster, to find hosts that serve several."""
        if mode == "query_instance" and query is None:
            raise ValueError("query_instance mode needs a query function")
        self.mode = mode
        self._shared = _shared_hosts(all_endpoints)
        self._query = query
        self._refresh = refresh
        self._clock = clock
        self._by_ip: dict[str, tuple[str | None, float]] = {}  # ip -> (instance id, resolved at)
        self._pending: set[str] = set()

    def instance_of(self, endpoint: EndpointView) -> str:
        """The instance id the controller uses for `endpoint` (never blocks)."""
        if self.mode == "identity":
            return endpoint.id
        explicit = endpoint.lmcache_instance_id
        if self.mode == "explicit" or explicit != endpoint.id:
            return explicit
        host = endpoint_host(endpoint.url)
        if host in self._shared:
            return explicit
        found = self._by_ip.get(host)
        return found[0] if found is not None and found[0] else explicit

    def to_endpoints(self, endpoints: Sequence[EndpointView]) -> dict[str, str]:
        """instance id -> endpoint id for `endpoints` (first endpoint wins on a clash)."""
        mapping: dict[str, str] = {}
        for ep in endpoints:
            mapping.setdefault(self.instance_of(ep), ep.id)
        return mapping

    def claim_stale(self, endpoints: Sequence[EndpointView]) -> list[str]:
        """Hosts whose `/query_instance` answer is missing or older than `refresh` and
        not already being resolved; they are marked pending until `resolve` ends."""
        if self.mode != "query_instance":
            return []
        now = self._clock()
        hosts = {endpoint_host(ep.url) for ep in endpoints if ep.lmcache_instance_id == ep.id}
        stale = sorted(h for h in hosts - self._shared - self._pending
                       if h not in self._by_ip or now - self._by_ip[h][1] >= self._refresh)
        self._pending.update(stale)
        return stale

    def unclaim(self, host: str) -> None:
        """`host` was claimed but its query never ran (e.g. dropped): let it be claimed again."""
        self._pending.discard(host)

    async def resolve(self, host: str) -> str | None:
        """Ask the controller which instance runs on `host` and cache the answer.
        A failed query keeps the previous answer and is asked again after `RETRY_AFTER`."""
        assert self._query is not None
        previous = self._by_ip.get(host, (None, 0.0))[0]
        try:
            instance = None
            for address in await _addresses(host):  # the controller knows workers by IP
                instance = await self._query(address)
                if instance is not None:
                    break
        except BaseException:
            # Ask again after a short pause, not a whole `refresh`.
            self._by_ip[host] = (previous, self._clock() - self._refresh + min(self._refresh, RETRY_AFTER))
            raise
        finally:
            self._pending.discard(host)
        self._by_ip[host] = (instance, self._clock())
        log.info("lmcache /query_instance %s -> %s", host, instance)
        return instance


async def _addresses(host: str) -> list[str]:
    """`host` if it is an IP address, else its addresses (IPv4 first); `host` itself
    when it does not resolve."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return [host]
    found = sorted({(family != socket.AF_INET, str(addr[0])) for family, _, _, _, addr in infos})
    return [address for _, address in found] or [host]


def _shared_hosts(endpoints: Sequence[EndpointView]) -> set[str]:
    counts = Counter(endpoint_host(ep.url) for ep in endpoints)
    return {host for host, n in counts.items() if n > 1}
