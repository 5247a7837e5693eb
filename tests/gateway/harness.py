"""A gateway in front of fake backends, all real aiohttp servers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import load_config_text
from gateway.state import STATE_KEY, GatewayState
from testbed.fake_openai import FakeBackend, create_fake_app


@dataclass
class Stack:
    gateway: TestServer
    backends: dict[str, FakeBackend]
    servers: dict[str, TestServer]
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    @property
    def state(self) -> GatewayState:
        return self.gateway.app[STATE_KEY]  # type: ignore[index]

    def access_log(self) -> list[dict[str, Any]]:
        import json

        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]


def gateway_yaml(ports: dict[str, int], log_path: Path, *, lb_policy: str = "least_inflight",
                 extra_filters: str = "", server: str = "", cluster: str = "") -> str:
    endpoints = "\n".join(f'      - {{id: {eid}, url: "http://127.0.0.1:{port}"}}' for eid, port in ports.items())
    return f"""
server: {{port: 0, debug_headers: true, max_body_bytes: 64KiB{server}}}
clusters:
  - name: llm
    lb_policy: {lb_policy}
    health_check: {{path: /health, interval: 50ms, timeout: 500ms, unhealthy_threshold: 1}}
    circuit_breaker: {{failure_threshold: 3, recovery_timeout: 200ms, half_open_max_calls: 1}}
    retry: {{max_attempts: 2}}
    timeouts: {{connect: 500ms, first_byte: 5s}}
    metrics_interval: 50ms{cluster}
    endpoints:
{endpoints}
routes:
  - {{match: {{prefix: /v1/}}, cluster: llm}}
filters:
  - type: prompt
{extra_filters}  - type: access-log
    config: {{path: "{log_path}"}}
"""


async def start_backend(fake: FakeBackend, port: int | None = None) -> TestServer:
    server = TestServer(create_fake_app(fake), host="127.0.0.1", port=port)
    await server.start_server()
    return server


async def start_gateway(yaml_text: str, monitor: bool = True) -> TestServer:
    app: web.Application = create_app(load_config_text(yaml_text), monitor=monitor)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@asynccontextmanager
async def fake_stack(tmp_path: Path, n: int = 2, cluster: str = "", timeouts: str = "") -> AsyncIterator[Stack]:
    """`n` fake backends a, b, ... behind a round-robin gateway; `cluster` is appended to the
    cluster's YAML, `timeouts` replaces its timeouts mapping."""
    fakes = {chr(ord("a") + i): FakeBackend(chr(ord("a") + i)) for i in range(n)}
    servers = {eid: await start_backend(f) for eid, f in fakes.items()}
    log_path = tmp_path / "access.jsonl"
    text = gateway_yaml({e: s.port for e, s in servers.items()}, log_path, lb_policy="round_robin", cluster=cluster)
    if timeouts:
        text = text.replace("timeouts: {connect: 500ms, first_byte: 5s}", f"timeouts: {{{timeouts}}}")
    gw = await start_gateway(text)
    try:
        yield Stack(gw, fakes, servers, log_path)
    finally:
        await gw.close()
        for server in servers.values():
            await server.close()
