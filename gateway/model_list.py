"""`GET /v1/models`: what each route at the request's path serves.

For each route, in config order: its exact model names (as clients ask for them),
then the models its cluster's eligible backends list, keeping those the route's
`model` condition admits (all of them when it has none, none when it rewrites the
name: clients reach those backends only by the route's own names). Deduplicated by id,
first seen wins.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx

from gateway.endpoints import ClusterRegistry
from gateway.routes import Route
from kvkernel.reply import LocalReply, error_reply


async def backend_models(http: httpx.AsyncClient, url: str, timeout: float) -> list[dict[str, Any]]:
    try:
        resp = await http.get(url + "/v1/models", timeout=timeout)
        data = resp.json().get("data", []) if resp.status_code == 200 else []
        return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
    except Exception:  # noqa: BLE001 - one bad backend must not break the list
        return []


async def cluster_models(http: httpx.AsyncClient, clusters: ClusterRegistry, name: str) -> list[dict[str, Any]] | None:
    """The union of the cluster's eligible backends' lists (None: no eligible backend)."""
    cluster = clusters[name]
    eligible = [e for e in cluster.endpoints if e.eligible()]
    if not eligible:
        return None
    timeout = cluster.config.health_check.timeout * 2
    lists = await asyncio.gather(*(backend_models(http, e.url, timeout) for e in eligible))
    return [m for models in lists for m in models]


def _card(model_id: str, owner: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owner}


async def list_models(http: httpx.AsyncClient, routes: Sequence[Route], clusters: ClusterRegistry) -> LocalReply:
    names = list(dict.fromkeys(r.cluster for r in routes))
    fetched = await asyncio.gather(*(cluster_models(http, clusters, n) for n in names))
    by_cluster = dict(zip(names, fetched, strict=True))
    if not any(r.exact for r in routes) and all(v is None for v in fetched):
        return error_reply(503, f"no healthy endpoint in cluster '{names[0]}'", code="no_healthy_endpoint")
    merged: dict[str, dict[str, Any]] = {}
    for route in routes:
        for name in route.exact:
            merged.setdefault(name, _card(name, route.cluster))
        if route.rewrite_model is not None:
            continue
        for model in by_cluster[route.cluster] or []:
            if not route.has_model or route.serves(model["id"]):
                merged.setdefault(model["id"], model)
    return LocalReply(200, {"object": "list", "data": list(merged.values())})
