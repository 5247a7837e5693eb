"""The mock controller's ZMQ side: the three monitor sockets and the links to worker REP sockets.

Sockets as in lmcache 0.5.6: "pull" (PULL: BatchedKVOperationMsg, DeRegisterMsg),
"reply" (ROUTER: RegisterMsg -> RegisterRetMsg with extra_config.heartbeat_url) and
"heartbeat" (ROUTER: HeartbeatMsg -> HeartbeatRetMsg). Frames are msgpack, or JSON
when they start with `{`; replies are msgpack; a bad frame is logged and counted and
never stops a loop.

Unlike the real controller, calls to a worker's REP socket are serialised per worker
and time-boxed (`worker_timeout`): a dead worker yields an error, not a hung request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import zmq
import zmq.asyncio

from kvproto.messages import ProtocolError, decode, encode, make
from testbed.mock_lmcache.state import Registry, Worker

log = logging.getLogger(__name__)


class WorkerCallError(RuntimeError):
    """A control message to a worker failed (timeout, bad reply)."""


class WorkerLink:
    """A REQ socket to one worker's REP control socket; recreated after any failure."""

    def __init__(self, ctx: zmq.asyncio.Context, worker: Worker, timeout: float) -> None:
        self.url = f"tcp://{worker.ip}:{worker.port}"
        self.name = f"({worker.instance_id}, {worker.worker_id})"
        self._ctx = ctx
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self._sock: zmq.asyncio.Socket | None = None

    async def call(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        async with self._lock:
            if self._sock is None:
                self._sock = self._ctx.socket(zmq.REQ)
                self._sock.setsockopt(zmq.LINGER, 0)
                self._sock.connect(self.url)
            try:
                async with asyncio.timeout(self._timeout):
                    await self._sock.send(encode(msg))
                    return decode(await self._sock.recv())
            except (TimeoutError, zmq.ZMQError, ProtocolError) as exc:
                self.close()  # a REQ socket that missed its reply is wedged
                reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                raise WorkerCallError(f"worker {self.name} at {self.url}: {reason}") from exc

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


class ZmqFrontend:
    """Binds the monitor ports and keeps `registry` up to date from worker messages."""

    def __init__(
        self, registry: Registry, host: str, ports: Mapping[str, int], worker_timeout: float
    ) -> None:
        self.registry = registry
        self.host = host
        self.ports = dict(ports)
        self.worker_timeout = worker_timeout
        self.counters: dict[str, int] = dict.fromkeys(
            ("pull_messages", "reply_messages", "heartbeat_messages", "bad_frames",
             "dropped_ops"), 0)  # fmt: skip
        self._ctx = zmq.asyncio.Context()
        self._links: dict[tuple[str, int], WorkerLink] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        pull = self._bind(zmq.PULL, "pull")
        self._tasks.append(asyncio.create_task(self._pull_loop(pull)))
        self._tasks.append(asyncio.create_task(self._router_loop(self._bind(zmq.ROUTER, "reply"),
                                                                 self._on_request)))  # fmt: skip
        if "heartbeat" in self.ports:
            hb = self._bind(zmq.ROUTER, "heartbeat")
            self._tasks.append(asyncio.create_task(self._router_loop(hb, self._on_heartbeat)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in self._links.values():
            link.close()
        self._ctx.destroy(linger=0)

    def _bind(self, kind: int, name: str) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"tcp://{self.host}:{self.ports[name]}")
        return sock

    # ---- worker -> controller --------------------------------------------------------

    async def _pull_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            for part in await sock.recv_multipart():
                self.counters["pull_messages"] += 1
                try:
                    self._on_push(decode(part))
                except ProtocolError as exc:
                    self.counters["bad_frames"] += 1
                    log.warning("bad frame on pull socket: %s", exc)

    def _on_push(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "BatchedKVOperationMsg":
            if not self.registry.apply_ops(msg):
                self.counters["dropped_ops"] += len(msg["operations"])
                log.warning("KV ops from unregistered worker (%s, %s) dropped",
                            msg["instance_id"], msg["worker_id"])  # fmt: skip
        elif msg["type"] == "DeRegisterMsg":
            self.forget_worker(msg["instance_id"], msg["worker_id"])
        else:
            log.warning("unexpected %s on pull socket ignored", msg["type"])

    async def _router_loop(
        self, sock: zmq.asyncio.Socket, answer: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> None:
        while True:
            frames = await sock.recv_multipart()
            if len(frames) < 3:
                self.counters["bad_frames"] += 1
                continue
            try:
                reply = answer(decode(frames[2]))
            except ProtocolError as exc:
                self.counters["bad_frames"] += 1
                reply = make("ErrorMsg", error=str(exc))
            await sock.send_multipart([frames[0], b"", encode(reply)])

    def _on_request(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.counters["reply_messages"] += 1
        if msg["type"] != "RegisterMsg":
            return make("ErrorMsg", error=f"Unknown message type: {msg['type']}")
        worker, created = self.registry.register(msg)
        if created:
            self._links[(worker.instance_id, worker.worker_id)] = WorkerLink(
                self._ctx, worker, self.worker_timeout
            )
        extra = {}
        if "heartbeat" in self.ports:
            extra["heartbeat_url"] = f"{self.host}:{self.ports['heartbeat']}"
        return make("RegisterRetMsg", extra_config=extra)

    def _on_heartbeat(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.counters["heartbeat_messages"] += 1
        if msg["type"] != "HeartbeatMsg":
            return make("ErrorMsg", error=f"Expected HeartbeatMsg, got {msg['type']}")
        commands = self.registry.heartbeat(msg)
        key = (msg["instance_id"], msg["worker_id"])
        if commands and key not in self._links:
            worker = self.registry.get(*key)
            assert worker is not None
            self._links[key] = WorkerLink(self._ctx, worker, self.worker_timeout)
        return make("HeartbeatRetMsg", commands=commands)

    def forget_worker(self, instance_id: str, worker_id: int) -> None:
        self.registry.deregister(instance_id, worker_id)
        link = self._links.pop((instance_id, worker_id), None)
        if link is not None:
            link.close()

    # ---- controller -> worker --------------------------------------------------------

    async def call_instance(
        self, instance_id: str, build: Callable[[int], dict[str, Any]]
    ) -> list[tuple[int, dict[str, Any]]]:
        """Send `build(worker_id)` to every worker of the instance at once; (worker_id, reply)."""
        links = []
        for worker in self.registry.workers(instance_id):
            link = self._links.get((instance_id, worker.worker_id))
            if link is None:
                raise WorkerCallError(
                    f"Worker {worker.worker_id} not registered for instance {instance_id}"
                )
            links.append((worker.worker_id, link))
        replies = await asyncio.gather(*(link.call(build(wid)) for wid, link in links))
        return [(wid, reply) for (wid, _), reply in zip(links, replies, strict=True)]

    def expire_workers(self, timeout: float) -> int:
        dead = self.registry.expire(timeout)
        for worker in dead:
            link = self._links.pop((worker.instance_id, worker.worker_id), None)
            if link is not None:
                with contextlib.suppress(zmq.ZMQError):
                    link.close()
        return len(dead)
