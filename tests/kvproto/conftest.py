"""Fixtures for kvproto tests: a minimal in-test LMCache controller speaking the real ZMQ framing (ROUTER/ROUTER/PULL).

It records every message it receives and answers registration and heartbeats; tests
can make it silent (to look like a dead or hung controller) or change its heartbeat
reply.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import zmq
import zmq.asyncio

from kvproto.messages import decode, encode, make
from testbed.procs import free_ports


class FakeController:
    def __init__(self, ports: dict[str, int] | None = None) -> None:
        pull, reply, heartbeat = free_ports(3)
        self.ports = ports or {"pull": pull, "reply": reply, "heartbeat": heartbeat}
        self.received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.answer = True
        self.heartbeat_commands: list[dict[str, Any]] = []
        self._ctx = zmq.asyncio.Context()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> FakeController:
        pull = self._ctx.socket(zmq.PULL)
        pull.bind(f"tcp://127.0.0.1:{self.ports['pull']}")
        self._tasks.append(asyncio.create_task(self._pull_loop(pull)))
        for kind in ("reply", "heartbeat"):
            router = self._ctx.socket(zmq.ROUTER)
            router.bind(f"tcp://127.0.0.1:{self.ports[kind]}")
            self._tasks.append(asyncio.create_task(self._router_loop(router)))
        return self

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._ctx.destroy(linger=0)

    async def next(self, kind: str, within: float = 5.0) -> dict[str, Any]:
        """The next received message of type `kind` (others are skipped)."""
        async with asyncio.timeout(within):
            while True:
                msg = await self.received.get()
                if msg["type"] == kind:
                    return msg

    async def _pull_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            for part in await sock.recv_multipart():
                await self.received.put(decode(part))

    async def _router_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            identity, _, payload = await sock.recv_multipart()
            if not self.answer:
                continue
            msg = decode(payload)
            await self.received.put(msg)
            if msg["type"] == "RegisterMsg":
                reply = make("RegisterRetMsg")
            else:
                reply = make("HeartbeatRetMsg", commands=self.heartbeat_commands)
            await sock.send_multipart([identity, b"", encode(reply)])


@pytest.fixture
def fake_controller_cls() -> type[FakeController]:
    """The FakeController class (tests construct it with or without starting it)."""
    return FakeController
