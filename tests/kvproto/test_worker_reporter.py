"""WorkerReporter against a controller speaking the real ZMQ framing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import pytest
import zmq
import zmq.asyncio

from kvproto.messages import decode, encode, make
from kvproto.worker import WorkerReporter

if TYPE_CHECKING:
    from tests.kvproto.conftest import FakeController


class RecordingHandler:
    """A ControlHandler that records calls and returns fixed answers."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def pin(self, tokens: list[int], location: str) -> int:
        self.calls.append(("pin", tokens, location))
        return len(tokens)

    async def clear(self, location: str) -> int:
        raise RuntimeError("disk on fire")

    async def compress(self, tokens: list[int] | None, method: str, location: str) -> int:
        self.calls.append(("compress", tokens, method, location))
        return 512

    async def decompress(self, tokens: list[int] | None, method: str, location: str) -> int:
        return 256

    async def health(self) -> int:
        return 0


@pytest.fixture
async def controller(fake_controller_cls: type[FakeController]) -> AsyncIterator[FakeController]:
    ctl = await fake_controller_cls().start()
    yield ctl
    await ctl.close()


async def until(predicate: Callable[[], bool], within: float) -> bool:
    """Poll `predicate` until true or `within` seconds pass (a deadline, not a fixed sleep)."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def reporter_for(ctl: FakeController, **kw: Any) -> WorkerReporter:
    kw.setdefault("heartbeat_interval", 0.1)
    kw.setdefault(
        "request_timeout", 1.0
    )  # generous: a loaded CI box must not fake a lost controller
    return WorkerReporter(
        controller_host="127.0.0.1",
        ports=ctl.ports,
        instance_id="inst-a",
        handler=RecordingHandler(),
        **kw,
    )


async def test_registers_then_streams_admits_and_evicts_with_sequence(
    controller: FakeController,
) -> None:
    rep = reporter_for(controller)
    await rep.start()
    try:
        reg = await controller.next("RegisterMsg")
        assert (reg["instance_id"], reg["worker_id"], reg["ip"], reg["port"]) == (
            "inst-a",
            0,
            "127.0.0.1",
            rep.control_port,
        )
        assert reg["peer_init_url"] is None
        assert await rep.wait_registered(5)
        rep.admit([1, 2, 3])
        rep.admit([2])  # already held: not reported again
        first = await controller.next("BatchedKVOperationMsg")
        assert first["location"] == "LocalCPUBackend"
        assert [(o["op_type"], o["key"], o["seq_num"]) for o in first["operations"]] == [
            ("admit", 1, 0),
            ("admit", 2, 1),
            ("admit", 3, 2),
        ]
        rep.evict([2, 99], location="LocalCPUBackend")  # 99 was never held
        second = await controller.next("BatchedKVOperationMsg")
        assert [(o["op_type"], o["key"], o["seq_num"]) for o in second["operations"]] == [
            ("evict", 2, 3)
        ]
        assert rep.stats["admitted"] == 3 and rep.stats["evicted"] == 1
        assert (await controller.next("HeartbeatMsg"))["port"] == rep.control_port
    finally:
        await rep.close()
    assert (await controller.next("DeRegisterMsg"))["instance_id"] == "inst-a"


async def test_reports_made_while_controller_is_down_arrive_after_it_starts(
    fake_controller_cls: type[FakeController],
) -> None:
    ctl = fake_controller_cls()
    rep = reporter_for(ctl, request_timeout=0.2)
    await rep.start()
    try:
        t0 = time.monotonic()
        rep.admit(range(10, 2010))
        assert time.monotonic() - t0 < 0.5  # never blocks the backend
        assert not await rep.wait_registered(1.0)
        assert rep.stats["register_failures"] >= 1
        await ctl.start()
        keys: list[int] = []
        while len(keys) < 2000:
            msg = await ctl.next("BatchedKVOperationMsg")
            keys += [o["key"] for o in msg["operations"]]
        assert keys == list(range(10, 2010))
    finally:
        await rep.close()
        await ctl.close()


async def test_lost_controller_means_reregister_and_resend_everything(
    controller: FakeController,
) -> None:
    rep = reporter_for(controller)
    await rep.start()
    try:
        assert await rep.wait_registered(5)
        rep.admit([7, 8])
        rep.evict([7])
        assert await rep.flush(5)
        controller.answer = False  # hung controller: heartbeats time out
        assert await until(lambda: not rep.registered, within=5)
        controller.answer = True
        await controller.next("RegisterMsg")
        resent = await controller.next("BatchedKVOperationMsg")
        while [o["key"] for o in resent["operations"]] != [8]:
            resent = await controller.next("BatchedKVOperationMsg")
        assert resent["operations"][0]["op_type"] == "admit"
        assert rep.stats["heartbeat_failures"] >= 1 and rep.stats["registrations"] >= 2
    finally:
        await rep.close()


@pytest.mark.parametrize(
    ("reason", "resyncs"), [("worker_re_registered", True), ("controller_restart", False)]
)
async def test_full_sync_command_in_heartbeat(
    controller: FakeController, reason: str, resyncs: bool
) -> None:
    rep = reporter_for(controller)
    await rep.start()
    try:
        assert await rep.wait_registered(5)
        rep.admit([42])
        assert await rep.flush(5)
        before = rep.stats["resyncs"]
        controller.heartbeat_commands = [
            {"command_type": "full_sync", "reason": reason, "args": None}
        ]
        for _ in range(3):
            await controller.next("HeartbeatMsg")
        assert await rep.flush(5)
        assert (rep.stats["resyncs"] > before) is resyncs
    finally:
        await rep.close()


async def control_request(port: int, frame: bytes) -> dict[str, Any]:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        await sock.send(frame)
        async with asyncio.timeout(5):
            return decode(await sock.recv())
    finally:
        ctx.destroy(linger=0)


async def test_control_messages_are_dispatched_and_errors_answered(
    controller: FakeController,
) -> None:
    rep = reporter_for(controller)
    await rep.start()
    port = rep.control_port
    try:
        pin = await control_request(
            port,
            encode(
                make(
                    "PinWorkerMsg",
                    worker_event_id="e1",
                    location="LocalCPUBackend",
                    tokens=[1, 2, 3],
                )
            ),
        )
        assert pin == {"type": "PinWorkerRetMsg", "num_tokens": 3}
        comp = await control_request(
            port,
            encode(make("CompressWorkerMsg", worker_event_id="e2", method="zstd", location="L")),
        )
        assert comp["num_tokens"] == 512
        assert rep.handler.calls[-1] == ("compress", None, "zstd", "L")  # type: ignore[attr-defined]
        health = await control_request(port, encode(make("HealthWorkerMsg", worker_event_id="e3")))
        assert health == {"type": "HealthWorkerRetMsg", "error_code": 0}
        clear = await control_request(
            port, encode(make("ClearWorkerMsg", worker_event_id="e4", location="L"))
        )
        assert clear["type"] == "ErrorMsg" and "disk on fire" in clear["error"]
        bad = await control_request(port, b"\xc1garbage")
        assert bad["type"] == "ErrorMsg"
        move = await control_request(
            port,
            encode(
                make(
                    "MoveWorkerMsg", worker_event_id="e5", old_position="L", new_position=["u", "L"]
                )
            ),
        )
        assert move["type"] == "ErrorMsg" and "unsupported" in move["error"]
        # JSON control frames work too, and the socket still serves after errors
        again = await control_request(port, b'{"type":"HealthWorkerMsg","worker_event_id":"e6"}')
        assert again["error_code"] == 0
        assert rep.stats["control_msgs"] == 7 and rep.stats["control_errors"] == 2
    finally:
        await rep.close()


async def test_admit_from_another_thread(controller: FakeController) -> None:
    rep = reporter_for(controller)
    await rep.start()
    try:
        assert await rep.wait_registered(5)
        thread = threading.Thread(target=rep.admit, args=([5, 6],))
        thread.start()
        thread.join()
        msg = await controller.next("BatchedKVOperationMsg")
        assert [o["key"] for o in msg["operations"]] == [5, 6]
    finally:
        await rep.close()


async def test_close_is_bounded_with_a_dead_controller(
    fake_controller_cls: type[FakeController],
) -> None:
    ctl = fake_controller_cls()  # never started
    rep = reporter_for(ctl)
    await rep.start()
    rep.admit([1])
    t0 = time.monotonic()
    await rep.close()
    await rep.close()  # idempotent
    assert time.monotonic() - t0 < 3.0
    await ctl.close()


async def test_busy_control_port_fails_start_and_close_still_works(
    fake_controller_cls: type[FakeController],
) -> None:
    ctl = fake_controller_cls()
    first = reporter_for(ctl)
    await first.start()
    clash = reporter_for(ctl, control_port=first.control_port)
    try:
        with pytest.raises(zmq.ZMQError):
            await clash.start()
        with pytest.raises(RuntimeError, match="twice"):
            await first.start()
    finally:
        await clash.close()
        await first.close()
        await ctl.close()


async def test_a_lost_evict_report_reregisters_so_the_controller_drops_the_key(
    controller: FakeController, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-sending the held keys alone cannot retract an evict the controller never got;
    registering again does (the controller clears a re-registering worker's keys)."""
    rep = reporter_for(controller, heartbeat_interval=30.0)  # no heartbeat re-registers for us
    await rep.start()
    try:
        assert await rep.wait_registered(5)
        rep.admit([1, 2])
        assert await rep.flush(5)
        await controller.next("BatchedKVOperationMsg")
        assert rep._push is not None
        real_send = rep._push.send
        calls = {"n": 0}

        def send_once_fails(data: Any, flags: int = 0, **kw: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise zmq.Again()
            return real_send(data, flags, **kw)

        monkeypatch.setattr(rep._push, "send", send_once_fails)
        rep.evict([1])  # this report is lost
        assert (await controller.next("RegisterMsg", within=5))["instance_id"] == "inst-a"
        resent = await controller.next("BatchedKVOperationMsg", within=5)
        assert [(o["op_type"], o["key"]) for o in resent["operations"]] == [("admit", 2)]
        assert rep.stats["send_errors"] == 1
    finally:
        await rep.close()


async def test_an_overflowing_queue_reregisters_so_dropped_evicts_are_retracted(
    controller: FakeController, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kvproto.worker.MAX_PENDING", 3)
    rep = reporter_for(controller, heartbeat_interval=30.0)
    await rep.start()
    try:
        assert await rep.wait_registered(5)
        rep.admit([1, 2])
        assert await rep.flush(5)
        await controller.next("BatchedKVOperationMsg")
        rep.evict([1])  # queued, then dropped by the overflow below (no await in between)
        rep.admit([10, 11, 12, 13])
        assert rep.stats["dropped"] >= 1
        await controller.next("RegisterMsg", within=5)
        resent = await controller.next("BatchedKVOperationMsg", within=5)
        assert sorted(o["key"] for o in resent["operations"]) == [2, 10, 11, 12, 13]
        assert {o["op_type"] for o in resent["operations"]} == {"admit"}
    finally:
        await rep.close()
