"""Helpers to run an LMCache controller (the mock, or the real `lmcache_controller`) in tests.

Used by this package's tests and by anyone who needs a controller process: the
gateway's integration tests, the simulated vLLM, the smoke stack.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from testbed.procs import HOST, ManagedProcess, free_ports, kvgate_cmd


@dataclass
class ControllerProcess:
    """A running controller: its HTTP URL, ZMQ monitor ports and process."""

    kind: str  # "mock" or "real"
    http_port: int
    ports: dict[str, int]
    proc: ManagedProcess
    admin_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin_port or self.http_port}"

    def stop(self) -> None:
        self.proc.stop()

    def restart(self, timeout: float = 180.0) -> None:
        """Stop the process and start a fresh one (empty state) on the same ports."""
        self.proc.stop()
        self.proc = ManagedProcess(self.proc.name, self.proc.args, self.proc.log_path).start()
        self.proc.wait_http(f"{self.admin_url}/metrics", timeout)


def _start(kind: str, argv_head: list[str], log_dir: Path, extra: list[str], admin: bool,
           timeout: float) -> ControllerProcess:  # fmt: skip
    http_port, pull, reply, heartbeat, admin_port = free_ports(5)
    ports = {"pull": pull, "reply": reply, "heartbeat": heartbeat}
    argv = [
        *argv_head,
        "--host",
        HOST,
        "--port",
        str(http_port),
        "--monitor-ports",
        json.dumps(ports),
    ]
    if admin:
        argv += ["--admin-port", str(admin_port)]
    name = f"{kind}-lmcache-{http_port}"
    proc = ManagedProcess(name, [*argv, *extra], log_dir / f"{name}.log").start()
    ctl = ControllerProcess(kind, http_port, ports, proc, admin_port if admin else None)
    try:
        proc.wait_http(f"{ctl.admin_url}/metrics" if admin else f"{ctl.url}/metrics", timeout)
    except BaseException:
        proc.stop()
        raise
    return ctl


def start_mock_controller(
    log_dir: Path, *extra: str, admin: bool = False, timeout: float = 30.0
) -> ControllerProcess:
    """`kvgate mock-lmcache` on free ports (with `--admin-port` if `admin`)."""
    return _start("mock", kvgate_cmd("mock-lmcache"), log_dir, list(extra), admin, timeout)


def start_real_controller(
    executable: str, log_dir: Path, timeout: float = 180.0
) -> ControllerProcess:
    """The real `lmcache_controller` at `executable` on free ports (its import is slow)."""
    return _start("real", [executable], log_dir, [], False, timeout)


@dataclass
class RecordingHandler:
    """A ControlHandler that records each call and answers from `results` (or raises `fail`)."""

    results: dict[str, int] = field(
        default_factory=lambda: {"pin": 0, "clear": 0, "compress": 0, "decompress": 0, "health": 0}
    )
    fail: dict[str, Exception] = field(default_factory=dict)
    gate: asyncio.Event | None = None  # when set to an Event, pin waits for it
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def _answer(self, name: str, *args: Any) -> int:
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail[name]
        return self.results[name]

    async def pin(self, tokens: list[int], location: str) -> int:
        if self.gate is not None:
            await self.gate.wait()
        return self._answer("pin", tokens, location)

    async def clear(self, location: str) -> int:
        return self._answer("clear", location)

    async def compress(self, tokens: list[int] | None, method: str, location: str) -> int:
        return self._answer("compress", tokens, method, location)

    async def decompress(self, tokens: list[int] | None, method: str, location: str) -> int:
        return self._answer("decompress", tokens, method, location)

    async def health(self) -> int:
        return self._answer("health")


async def wait_for_layout(
    client: httpx.AsyncClient,
    tokens: list[int],
    expect: Mapping[str, Any] | Callable[[dict[str, Any]], bool],
    within: float = 10.0,
) -> dict[str, Any]:
    """Poll `/lookup` until its layout_info equals `expect` (or satisfies it); return it.

    Lookups reflect admits asynchronously, so tests poll with a deadline.
    """
    deadline = time.monotonic() + within
    layout: dict[str, Any] = {}
    while time.monotonic() < deadline:
        resp = await client.post("/lookup", json={"tokens": tokens})
        resp.raise_for_status()
        layout = resp.json()["layout_info"]
        if expect(layout) if callable(expect) else layout == expect:
            return layout
        await asyncio.sleep(0.02)
    raise AssertionError(f"layout_info never became {expect!r}; last: {layout!r}")
