"""Helpers shared by the kvcache tests: a cluster directory, request contexts, controller
replies. The `make_rig` fixture (tests/filters/conftest.py) builds a started filter."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import respx
from prometheus_client import CollectorRegistry

from filters.keys import TOKENS, Tokens
from filters.kvcache import KVCacheFilter
from gateway.config import ClusterConfig, EndpointConfig
from gateway.endpoints import ClusterRegistry, build_cluster
from kvkernel.context import RequestContext

CTL = "http://127.0.0.1:9999"


PROMPT = list(range(100, 100 + 1100))  # four full chunks + a partial one


@dataclass
class Rig:
    filter: KVCacheFilter
    clusters: ClusterRegistry
    metrics: CollectorRegistry
    router: respx.MockRouter

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.metrics.get_sample_value(name, labels or {}) or 0.0


def _clusters() -> ClusterRegistry:
    endpoints = [EndpointConfig("a", "http://127.0.0.1:8101", lmcache_instance_id="inst-a"),
                 EndpointConfig("b", "http://127.0.0.1:8102"),
                 EndpointConfig("c", "http://127.0.0.2:8103")]
    other = [EndpointConfig("z", "http://127.0.0.1:8199")]
    return ClusterRegistry([build_cluster(ClusterConfig("llm", endpoints)),
                            build_cluster(ClusterConfig("other", other))])


def ctx_for(tokens: list[int] | None = PROMPT, cluster: str = "llm") -> RequestContext:
    ctx = RequestContext("r", "POST", "/v1/completions")
    ctx.cluster = cluster
    if tokens is not None:
        ctx[TOKENS] = Tokens(tokens, "request")
    return ctx


async def complete(kv: KVCacheFilter, endpoint: str, tokens: list[int] = PROMPT, status: int = 200) -> None:
    ctx = ctx_for(tokens)
    await kv.on_request(ctx)
    ctx.endpoint, ctx.status = endpoint, status
    ctx.ttfb_ms = 5.0 if status == 200 else None
    await kv.on_complete(ctx)


def layout(**entries: tuple[str, int]) -> httpx.Response:
    return httpx.Response(200, json={"event_id": "e1", "layout_info": {k: list(v) for k, v in entries.items()}})


class DroppingQueue:
    """A background queue that is full for the first `full` submits, then runs jobs."""

    def __init__(self, full: int) -> None:
        self.full = full
        self.tasks: list[asyncio.Task[None]] = []

    def submit(self, name: str, job: Callable[[], Awaitable[None]]) -> bool:
        if self.full > 0:
            self.full -= 1
            return False
        self.tasks.append(asyncio.ensure_future(job()))
        return True


def _endpoint(rig: Any, endpoint_id: str) -> Any:
    return next(ep for ep in rig.clusters.endpoints("llm") if ep.id == endpoint_id)
