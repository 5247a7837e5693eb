"""The worker side of the LMCache controller protocol, for any backend (MLX daemon, sim-vllm).

`WorkerReporter` makes a backend appear in the controller's `/lookup` exactly as an
LMCache worker does (lmcache 0.5.6 `cache_controller/worker.py`):

- registers with `RegisterMsg` on a DEALER socket to the controller's "reply" ROUTER
  (frames `[b"", payload]`, the same framing a REQ socket produces), then sends
  `HeartbeatMsg` every `heartbeat_interval` to the "heartbeat" ROUTER;
- reports chunk keys as `BatchedKVOperationMsg` on PUSH to "pull", with a sequence
  number per location, and `DeRegisterMsg` on close;
- answers the controller's control messages on its own REP socket by calling the
  backend's `ControlHandler`.

Failure contract: nothing here raises into the backend or blocks it. Requests are
time-boxed; a timed-out socket is closed and recreated (so it never wedges). When
the controller loses our state (it was down, restarted, or answers a heartbeat with
a full-sync command) the reporter re-registers and re-sends every key it holds. So
does it when one of its own reports is lost (a failed send, or the queue overflowing):
registering again makes the controller forget the worker's keys, which is the only
way to retract an evict it never received.
`admit`/`evict` only append to a bounded queue and may be called from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import zmq
import zmq.asyncio

from kvproto.control import ControlHandler, dispatch_control
from kvproto.messages import OP_ADMIT, OP_EVICT, ProtocolError, decode, encode, kv_ops, make

__all__ = ["ControlHandler", "WorkerReporter", "dispatch_control"]

log = logging.getLogger(__name__)

MAX_OPS_PER_MSG = 1000
MAX_PENDING = 200_000


class WorkerReporter:
    """Registers a backend with an LMCache controller and streams its chunk keys."""

    def __init__(
        self,
        *,
        controller_host: str,
        ports: Mapping[str, int],
        instance_id: str,
        handler: ControlHandler,
        worker_id: int = 0,
        ip: str = "127.0.0.1",
        control_port: int = 0,
        location: str = "LocalCPUBackend",
        heartbeat_interval: float = 2.0,
        request_timeout: float = 2.0,
        handler_timeout: float = 30.0,
    ) -> None:
        self.controller_host = controller_host
        self.ports = dict(ports)
        self.instance_id = instance_id
        self.handler = handler
        self.worker_id = worker_id
        self.ip = ip
        self.control_port = control_port
        self.location = location
        self.heartbeat_interval = heartbeat_interval
        self.request_timeout = request_timeout
        self.handler_timeout = handler_timeout
        self.stats: dict[str, int] = dict.fromkeys(
            ("admitted", "evicted", "sent_ops", "send_errors", "dropped", "control_msgs",
             "control_errors", "registrations", "register_failures", "heartbeats",
             "heartbeat_failures", "resyncs"), 0)  # fmt: skip
        self._held: dict[str, dict[int, None]] = {}  # location -> ordered set of reported keys
        self._pending: list[tuple[str, str, int]] = []  # (location, op_type, key)
        self._seq: dict[str, int] = {}
        self._lock = threading.Lock()
        self._resync = True
        self._overflowed = False  # reports were dropped while registered: register again
        self._registered = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._lost = asyncio.Event()  # a report could not be sent: register again
        self._ctx: zmq.asyncio.Context | None = None
        self._push: zmq.asyncio.Socket | None = None
        self._rep: zmq.asyncio.Socket | None = None
        self._req: dict[str, zmq.asyncio.Socket] = {}
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def registered(self) -> bool:
        return self._registered

    # ---- backend-facing API ------------------------------------------------------------

    async def start(self) -> None:
        """Bind the REP control socket, then register and report in the background.

        Raises zmq.ZMQError if the control port cannot be bound (call `close()` after).
        """
        if self._ctx is not None:
            raise RuntimeError("WorkerReporter.start() called twice")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._ctx = zmq.asyncio.Context()
        self._rep = self._ctx.socket(zmq.REP)
        self._rep.setsockopt(zmq.LINGER, 0)
        if self.control_port:
            self._rep.bind(f"tcp://{self.ip}:{self.control_port}")
        else:
            self.control_port = self._rep.bind_to_random_port(f"tcp://{self.ip}")
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 10_000)
        self._push.connect(f"tcp://{self.controller_host}:{self.ports['pull']}")
        for coro in (self._control_loop(), self._session_loop(), self._send_loop()):
            self._tasks.append(asyncio.create_task(coro))

    async def close(self) -> None:
        """Send DeRegisterMsg (best effort), close every socket; bounded time."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._ctx is None:
            return
        if self._push is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._push.send(encode(self._endpoint_msg("DeRegisterMsg")), zmq.NOBLOCK)
            self._push.close(linger=300)
        for sock in [self._rep, *self._req.values()]:
            if sock is not None:
                sock.close(linger=0)
        self._req.clear()
        self._push = self._rep = None
        ctx, self._ctx = self._ctx, None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(ctx.term), 2.0)
        self._registered = False

    def admit(self, keys: Iterable[int], location: str | None = None) -> None:
        """Report chunks now held (non-blocking, thread-safe; duplicates are ignored)."""
        self._queue(OP_ADMIT, keys, location or self.location)

    def evict(self, keys: Iterable[int], location: str | None = None) -> None:
        """Report chunks no longer held (non-blocking, thread-safe; unknown keys are ignored)."""
        self._queue(OP_EVICT, keys, location or self.location)

    async def wait_registered(self, within: float) -> bool:
        """True once registered and the held keys were (re)sent, within `within` seconds."""
        return await self._wait_for(lambda: self._registered and not self._resync, within)

    async def flush(self, within: float) -> bool:
        """True once every queued report was handed to the socket, within `within` seconds."""
        return await self._wait_for(
            lambda: self._registered and not self._resync and not self._pending, within
        )

    # ---- internals ---------------------------------------------------------------------

    def _queue(self, op: str, keys: Iterable[int], location: str) -> None:
        with self._lock:
            held = self._held.setdefault(location, {})
            for key in keys:
                if (key in held) == (op == OP_ADMIT):
                    continue
                if op == OP_ADMIT:
                    held[key] = None
                else:
                    del held[key]
                self.stats["admitted" if op == OP_ADMIT else "evicted"] += 1
                if len(self._pending) >= MAX_PENDING:
                    self._pending.clear()  # the full re-send below supersedes the queue
                    self._resync = self._overflowed = True
                    self.stats["dropped"] += 1
                self._pending.append((location, op, key))
        self._notify()

    def _notify(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    async def _wait_for(self, ready: Any, within: float) -> bool:
        try:
            async with asyncio.timeout(within):
                while not ready():
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def _endpoint_msg(self, kind: str) -> dict[str, Any]:
        fields: dict[str, Any] = dict(
            instance_id=self.instance_id, worker_id=self.worker_id, ip=self.ip,
            port=self.control_port)  # fmt: skip
        if kind != "DeRegisterMsg":
            fields["peer_init_url"] = None
        return make(kind, **fields)

    async def _request(self, kind: str, msg: Mapping[str, Any]) -> dict[str, Any] | None:
        """One request/reply on the controller's `kind` ROUTER; None on any failure."""
        assert self._ctx is not None
        sock = self._req.get(kind)
        if sock is None:
            sock = self._req[kind] = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{self.controller_host}:{self.ports[kind]}")
        try:
            async with asyncio.timeout(self.request_timeout):
                await sock.send_multipart([b"", encode(msg)])
                frames = await sock.recv_multipart()
            return decode(frames[-1])
        except (TimeoutError, zmq.ZMQError, ProtocolError) as exc:
            log.debug("controller %s request failed: %r", kind, exc)
            sock.close(linger=0)  # a fresh socket drops any late reply
            del self._req[kind]
            return None

    async def _session_loop(self) -> None:
        """Register (with backoff), then heartbeat; re-register whenever the controller is lost."""
        backoff = 0.05
        while True:
            if not self._registered:
                reply = await self._request("reply", self._endpoint_msg("RegisterMsg"))
                if reply is None or reply["type"] != "RegisterRetMsg":
                    self.stats["register_failures"] += 1
                    if self.stats["register_failures"] == 1:  # one clear line, not one per retry
                        log.warning("LMCache controller tcp://%s:%s does not answer registration; retrying "
                                    "in the background (no chunks reported until it does)",
                                    self.controller_host, self.ports["reply"])
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.heartbeat_interval)
                    continue
                backoff = 0.05
                if self.stats["register_failures"] and not self.stats["registrations"]:
                    log.info("registered with LMCache controller tcp://%s:%s", self.controller_host,
                             self.ports["reply"])
                self.stats["registrations"] += 1
                with self._lock:  # re-registering clears our keys: re-send them all
                    self._registered, self._resync, self._overflowed = True, True, False
                self._wake.set()
            if await self._report_lost(within=self.heartbeat_interval):
                continue
            await self._heartbeat()

    async def _report_lost(self, within: float) -> bool:
        """Wait up to `within` seconds; True (and registration dropped) if a report was lost."""
        try:
            async with asyncio.timeout(within):
                await self._lost.wait()
        except TimeoutError:
            return False
        self._lost.clear()
        return True

    async def _heartbeat(self) -> None:
        reply = await self._request("heartbeat", self._endpoint_msg("HeartbeatMsg"))
        if reply is None or reply["type"] != "HeartbeatRetMsg":
            self.stats["heartbeat_failures"] += 1
            self._registered = False
            self._idle.set()
            return
        self.stats["heartbeats"] += 1
        # "controller_restart" is repeated to every worker of a fresh controller; we sent
        # our keys when we registered with it. Any other reason means it lost them.
        reasons = [c.get("reason") for c in reply["commands"] if isinstance(c, dict)]
        if any(r != "controller_restart" for r in reasons):
            self._resync = True
            self._wake.set()

    def _take_batches(self) -> list[tuple[str, str, list[int]]]:
        """Pending reports as (location, op, keys) runs; everything held if a resync is due."""
        with self._lock:
            if self._resync:
                self._resync = False
                self._pending.clear()
                self.stats["resyncs"] += 1
                return [(loc, OP_ADMIT, list(keys)) for loc, keys in self._held.items() if keys]
            pending, self._pending = self._pending, []
        runs: list[tuple[str, str, list[int]]] = []
        for loc, op, key in pending:
            if runs and runs[-1][0] == loc and runs[-1][1] == op:
                runs[-1][2].append(key)
            else:
                runs.append((loc, op, [key]))
        return runs

    async def _send_loop(self) -> None:
        while True:
            self._idle.set()
            await self._wake.wait()
            self._wake.clear()
            if not self._registered:
                continue  # ops before registration are dropped by the controller: keep them
            if self._overflowed:
                self._lose_registration()
                continue
            for loc, op, keys in self._take_batches():
                sent = all(self._send_ops(loc, op, keys[i : i + MAX_OPS_PER_MSG])
                           for i in range(0, len(keys), MAX_OPS_PER_MSG))
                if not sent:
                    break  # the re-registration's full re-send covers the rest

    def _send_ops(self, location: str, op: str, keys: list[int]) -> bool:
        """Push one batch; on failure register again, because the controller clears a
        re-registering worker's keys and only that retracts a lost evict (a re-sent
        admit list cannot)."""
        assert self._push is not None
        first = self._seq.get(location, -1) + 1
        msg = make("BatchedKVOperationMsg", instance_id=self.instance_id,
                   worker_id=self.worker_id, location=location,
                   operations=kv_ops(op, keys, first))  # fmt: skip
        try:
            self._push.send(encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError:
            self.stats["send_errors"] += 1
            self._lose_registration()
            return False
        self._seq[location] = first + len(keys) - 1
        self.stats["sent_ops"] += len(keys)
        return True

    def _lose_registration(self) -> None:
        """The controller's view is now wrong: register again (loop thread only)."""
        with self._lock:
            self._resync, self._overflowed = True, False
        self._registered = False
        self._lost.set()

    async def _control_loop(self) -> None:
        assert self._rep is not None
        while True:
            frame = await self._rep.recv()
            self.stats["control_msgs"] += 1
            try:
                msg = decode(frame)
                reply = await asyncio.wait_for(
                    dispatch_control(self.handler, msg), self.handler_timeout
                )
            except Exception as exc:  # noqa: BLE001 - every failure becomes an ErrorMsg reply
                self.stats["control_errors"] += 1
                reply = make("ErrorMsg", error=f"{type(exc).__name__}: {exc}")
            await self._rep.send(encode(reply))
