"""The lookup part of the `kvcache` filter: one bounded LMCache `/lookup`, mapped from
LMCache instance ids to the cluster's endpoint ids.

Every controller problem becomes an outcome string (hit, miss, timeout,
unavailable, breaker_open, error); nothing here fails a request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from filters.base import BackgroundSubmitter, EndpointView
from filters.instance_map import InstanceMap
from filters.kvcache_metrics import KVCacheMetrics
from filters.lmcache_client import (
    CircuitOpenError,
    LMCacheClient,
    LMCacheError,
    LMCacheUnavailable,
    LookupResult,
)

log = logging.getLogger("kvgate.kvcache")


@dataclass(frozen=True, slots=True)
class LookupOutcome:
    matched: dict[str, int]  # endpoint id -> prefix tokens the controller credits it with
    outcome: str
    seconds: float

    @property
    def reason(self) -> str:
        return "lmcache" if self.outcome == "hit" else f"lmcache_{self.outcome}"


class ControllerLookup:
    def __init__(self, client: LMCacheClient, instances: InstanceMap, metrics: KVCacheMetrics, *,
                 timeout: float, retry: bool) -> None:
        self.client = client
        self.instances = instances
        self.metrics = metrics
        self.timeout = timeout
        self.retry = retry

    async def lookup(self, tokens: list[int], endpoints: Sequence[EndpointView]) -> LookupOutcome:
        t0 = time.perf_counter()
        matched: dict[str, int] = {}
        outcome = "hit"
        try:
            result = await self.client.lookup(tokens, timeout=self.timeout, retry=self.retry)
        except CircuitOpenError:
            outcome = "breaker_open"
        except LMCacheUnavailable:
            spent = time.perf_counter() - t0
            outcome = "timeout" if spent >= self.timeout * 0.95 else "unavailable"
        except LMCacheError as exc:
            log.warning("lmcache lookup failed: %s", exc)
            outcome = "error"
        except Exception:  # a hint is never worth failing the request for
            log.exception("lmcache lookup raised unexpectedly")
            outcome = "error"
        else:
            matched = self._matched(result, endpoints, len(tokens))
            outcome = "hit" if matched else "miss"
        elapsed = time.perf_counter() - t0
        self.metrics.lookup(outcome, elapsed)
        return LookupOutcome(matched, outcome, elapsed)

    def _matched(self, result: LookupResult, endpoints: Sequence[EndpointView], prompt_len: int) -> dict[str, int]:
        """Matched tokens per endpoint, never more than the prompt (a controller's
        numbers are not trusted beyond what the request can hold)."""
        to_endpoint = self.instances.to_endpoints(endpoints)
        matched: dict[str, int] = {}
        for instance, (_, tokens) in result.layout.items():
            endpoint = to_endpoint.get(instance)
            if endpoint is not None and tokens > 0:
                matched[endpoint] = min(prompt_len, max(tokens, matched.get(endpoint, 0)))
        return matched

    def refresh_instances(self, endpoints: Sequence[EndpointView], background: BackgroundSubmitter) -> None:
        for host in self.instances.claim_stale(endpoints):
            if not background.submit("lmcache-query-instance", _resolver(self.instances, host)):
                self.instances.unclaim(host)  # dropped (queue full): ask again on a later request


def _resolver(instances: InstanceMap, host: str) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        await instances.resolve(host)

    return run
