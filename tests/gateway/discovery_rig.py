"""A gateway whose cluster `llm` discovers its endpoints, in front of real backends on
127.0.0.1, with the test's own DNS server (see `dns_server`) or a watched file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import load_config
from gateway.endpoints import Cluster
from gateway.reload import GENERATIONS_KEY, Generations
from gateway.state import STATE_KEY, GatewayState


def discovery_yaml(discovery: str, endpoints: str = "", lb_policy: str = "round_robin") -> str:
    return f"""
server: {{port: 0, debug_headers: true}}
clusters:
  - name: llm
    lb_policy: {lb_policy}
    health_check: {{path: /health, interval: 100ms, timeout: 500ms, unhealthy_threshold: 1}}
    metrics_interval: 100ms
    retry: {{max_attempts: 2}}
    timeouts: {{connect: 500ms, first_byte: 5s}}
    discovery: {discovery}
{endpoints}
routes:
  - {{match: {{prefix: /v1/}}, cluster: llm}}
"""


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def endpoints_file(path: Path, entries: list[dict[str, Any]]) -> None:
    write_atomically(path, json.dumps({"endpoints": entries}))


class Gateway:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.server: TestServer | None = None

    async def start(self, yaml_text: str) -> Gateway:
        write_atomically(self.config_path, yaml_text)
        app = create_app(load_config(self.config_path), monitor=True, config_path=str(self.config_path))
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def state(self) -> GatewayState:
        assert self.server is not None
        return self.server.app[STATE_KEY]

    @property
    def generations(self) -> Generations:
        assert self.server is not None
        return self.server.app[GENERATIONS_KEY]

    @property
    def cluster(self) -> Cluster:
        return self.state.clusters["llm"]

    def ids(self) -> list[str]:
        return sorted(e.id for e in self.cluster.endpoints)

    def healthy(self) -> list[str]:
        return sorted(e.id for e in self.cluster.endpoints if e.healthy)

    async def get_json(self, path: str) -> Any:
        async with aiohttp.ClientSession() as session, session.get(self.url + path) as resp:
            return await resp.json()

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as session, session.get(self.url + "/metrics") as resp:
            return await resp.text()

    async def status(self) -> dict[str, Any]:
        body: dict[str, Any] = await self.get_json("/kvgate/status")
        return body

    async def complete(self, n: int = 1) -> list[tuple[int, str]]:
        """`n` completions: (status, the endpoint that answered) each."""
        out = []
        async with aiohttp.ClientSession() as session:
            for _ in range(n):
                async with session.post(self.url + "/v1/completions", json={"model": "m", "prompt": "hi"}) as resp:
                    await resp.read()
                    out.append((resp.status, resp.headers.get("x-kvgate-endpoint", "")))
        return out

    async def reload(self, yaml_text: str | None = None) -> dict[str, Any]:
        if yaml_text is not None:
            write_atomically(self.config_path, yaml_text)
        async with aiohttp.ClientSession() as session, session.post(self.url + "/admin/reload") as resp:
            body: dict[str, Any] = await resp.json()
            assert resp.status == 200, body
            return body
