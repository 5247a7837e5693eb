"""Fixtures of the filter tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx
from prometheus_client import CollectorRegistry

from filters.base import Services
from filters.kvcache import KVCacheFilter
from filters.registry import build_filters, plan_filters
from gateway.background import BackgroundQueue
from gateway.config import FilterSpec
from tests.filters.kvcache_rig import CTL, Rig, _clusters


@pytest.fixture
async def make_rig() -> AsyncIterator[Any]:
    opened: list[tuple[Rig, BackgroundQueue, httpx.AsyncClient]] = []

    async def make(config: dict[str, Any], routes: Any = None) -> Rig:
        router = respx.mock(base_url=CTL, assert_all_called=False)
        if routes is not None:
            routes(router)
        router.start()
        http = httpx.AsyncClient()
        queue = BackgroundQueue(64)
        queue.start()
        clusters = _clusters()
        registry = CollectorRegistry()
        services = Services(clusters=clusters, background=queue, http=http, metrics=registry)
        (kv,) = build_filters(plan_filters([FilterSpec("kvcache", config=config)]), services)
        assert isinstance(kv, KVCacheFilter)
        await kv.start()
        rig = Rig(kv, clusters, registry, router)
        opened.append((rig, queue, http))
        return rig

    yield make
    for rig, queue, http in opened:
        await queue.close()
        await rig.filter.close()
        await http.aclose()
        rig.router.stop()
