"""Review findings for WorkerReporter: a lost report must not leave the controller's view stale."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest
import zmq

from kvproto.messages import ProtocolError, decode
from tests.kvproto.test_worker_reporter import reporter_for

if TYPE_CHECKING:
    from tests.kvproto.conftest import FakeController


@pytest.fixture
async def controller(fake_controller_cls: type[FakeController]) -> AsyncIterator[FakeController]:
    ctl = await fake_controller_cls().start()
    yield ctl
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


def test_a_deeply_nested_json_frame_is_a_protocol_error() -> None:
    """It used to escape `decode` as RecursionError, past every `except ProtocolError`."""
    frame = b'{"type": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(ProtocolError):
        decode(frame)
