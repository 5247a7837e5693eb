"""Every fault mode of the mock controller, set at run time (/admin/faults) and at start (flags)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import zmq
import zmq.asyncio

from kvproto.chunks import chunk_keys
from kvproto.worker import WorkerReporter
from testbed.mock_lmcache.cli import main as cli_main
from testbed.mock_lmcache.harness import (
    ControllerProcess,
    RecordingHandler,
    start_mock_controller,
    wait_for_layout,
)

LOC = "LocalCPUBackend"


@pytest.fixture(scope="module")
def mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    ctl = start_mock_controller(tmp_path_factory.mktemp("mock-faults"), "--worker-call-timeout", "0.5",
                                admin=True)  # fmt: skip
    yield ctl
    ctl.stop()


@pytest.fixture
async def api(mock: ControllerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mock.admin_url, timeout=5) as admin:
        assert (await admin.delete("/admin/faults")).status_code == 200
    async with httpx.AsyncClient(base_url=mock.url, timeout=5) as client:
        yield client
    async with httpx.AsyncClient(base_url=mock.admin_url, timeout=5) as admin:
        await admin.delete("/admin/faults")


async def set_faults(mock: ControllerProcess, **faults: object) -> httpx.Response:
    async with httpx.AsyncClient(base_url=mock.admin_url, timeout=5) as admin:
        return await admin.post("/admin/faults", json=faults)


async def lookup_status(client: httpx.AsyncClient) -> int:
    return (await client.post("/lookup", json={"tokens": [1, 2, 3]})).status_code


async def test_admin_reports_and_validates_faults(
    mock: ControllerProcess, api: httpx.AsyncClient
) -> None:
    current = (await api.get("/admin/faults")).json()
    assert current["latency_ms"] == 0 and current["hang"] is False and "injected" in current
    for bad, needle in [({"latency": 5}, "latency: unknown fault"), ({"error_rate": 1.5}, "error_rate"),
                        ({"hang": "yes"}, "hang: expected bool"), ({"latency_ms": True}, "latency_ms")]:  # fmt: skip
        resp = await set_faults(mock, **bad)
        assert resp.status_code == 400 and needle in resp.json()["detail"]
    async with httpx.AsyncClient(base_url=mock.admin_url) as admin:
        assert (await admin.post("/admin/faults", content=b"[1")).status_code == 400
    assert (await api.get("/admin/faults")).json()["error_rate"] == 0  # nothing half-applied


async def test_latency(mock: ControllerProcess, api: httpx.AsyncClient) -> None:
    assert (await set_faults(mock, latency_ms=300)).json()["latency_ms"] == 300
    t0 = time.monotonic()
    assert await lookup_status(api) == 200
    assert time.monotonic() - t0 >= 0.3
    assert (await api.get("/admin/faults")).json()["injected"]["delayed"] >= 1


async def test_error_rate_is_seeded_and_reproducible(
    mock: ControllerProcess, api: httpx.AsyncClient
) -> None:
    await set_faults(mock, error_rate=1.0)
    resp = await api.post("/lookup", json={"tokens": [1]})
    assert resp.status_code == 500 and resp.json() == {"detail": "injected fault"}
    patterns = []
    for _ in range(2):
        await set_faults(mock, error_rate=0.5, seed=7)
        patterns.append([await lookup_status(api) for _ in range(24)])
    assert patterns[0] == patterns[1]
    assert set(patterns[0]) == {200, 500}


async def test_faults_can_target_paths(mock: ControllerProcess, api: httpx.AsyncClient) -> None:
    await set_faults(mock, error_rate=1.0, paths=["/pin"])
    assert await lookup_status(api) == 200
    resp = await api.post("/pin", json={"instance_id": "x", "location": LOC, "tokens": [1]})
    assert resp.json() == {"detail": "injected fault"}


async def test_hang_holds_requests_until_released(
    mock: ControllerProcess, api: httpx.AsyncClient
) -> None:
    await set_faults(mock, hang=True)
    pending = asyncio.create_task(lookup_status(api))
    done, _ = await asyncio.wait({pending}, timeout=0.5)
    assert not done  # no answer while hung
    await set_faults(mock, hang=False)
    assert await asyncio.wait_for(pending, 5) == 200


async def test_down_refuses_connections_and_comes_back(
    mock: ControllerProcess, api: httpx.AsyncClient
) -> None:
    assert await lookup_status(api) == 200  # keep-alive connection now open
    await set_faults(mock, down=True)
    with pytest.raises(httpx.TransportError):
        await api.post("/lookup", json={"tokens": [1]})  # existing connection: reset
    async with httpx.AsyncClient(base_url=mock.url, timeout=2) as fresh:
        with pytest.raises(httpx.ConnectError):
            await fresh.post("/lookup", json={"tokens": [1]})  # new connection: refused
    assert (await set_faults(mock, down=False)).json()["down"] is False
    async with httpx.AsyncClient(base_url=mock.url, timeout=2) as fresh:
        assert await lookup_status(fresh) == 200


async def test_down_for_restores_by_itself(mock: ControllerProcess, api: httpx.AsyncClient) -> None:
    await set_faults(mock, down=True, down_for_s=0.3)
    deadline = time.monotonic() + 10
    async with httpx.AsyncClient(base_url=mock.url, timeout=2) as fresh:
        while True:
            try:
                assert await lookup_status(fresh) == 200
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "never came back up"
                await asyncio.sleep(0.05)
    async with httpx.AsyncClient(base_url=mock.admin_url) as admin:
        assert (await admin.get("/admin/faults")).json()["down"] is False


async def key_count(client: httpx.AsyncClient, instance_id: str) -> int:
    stats = (await client.get("/controller/key-stats")).json()
    return sum(i["key_count"] for i in stats["instances"] if i["instance_id"] == instance_id)


async def test_stale_reports_evicted_chunks(
    mock: ControllerProcess, api: httpx.AsyncClient
) -> None:
    tokens = [random.randrange(2**31) for _ in range(512)]
    rep = WorkerReporter(controller_host="127.0.0.1", ports=mock.ports, instance_id="stale-inst",
                         handler=RecordingHandler(), heartbeat_interval=0.5)  # fmt: skip
    await rep.start()
    try:
        rep.admit(chunk_keys(tokens))
        await wait_for_layout(api, tokens, {"stale-inst": [LOC, 512]})
        await set_faults(mock, stale=True)
        rep.evict(chunk_keys(tokens))
        deadline = time.monotonic() + 10
        while await key_count(api, "stale-inst") != 0:  # the evictions have reached the index
            assert time.monotonic() < deadline, "evictions never arrived"
            await asyncio.sleep(0.02)
        await wait_for_layout(api, tokens, {"stale-inst": [LOC, 512]}, within=0.1)  # still reported
        await set_faults(mock, stale=False)
        await wait_for_layout(api, tokens, {})
    finally:
        await rep.close()


async def test_hung_worker_times_out_and_its_link_recovers(
    mock: ControllerProcess, api: httpx.AsyncClient
) -> None:
    gate = asyncio.Event()
    handler = RecordingHandler(results={"pin": 9, "clear": 0, "compress": 0, "decompress": 0, "health": 0},
                               gate=gate)  # fmt: skip
    rep = WorkerReporter(controller_host="127.0.0.1", ports=mock.ports, instance_id="slow-inst",
                         handler=handler, heartbeat_interval=0.5)  # fmt: skip
    await rep.start()
    try:
        assert await rep.wait_registered(5)
        body = {"instance_id": "slow-inst", "location": LOC, "tokens": [1, 2]}
        resp = await api.post("/pin", json=body)
        assert resp.status_code == 500 and "timed out" in resp.json()["detail"]
        gate.set()
        resp = await api.post("/pin", json=body)
        assert resp.status_code == 200 and resp.json()["num_tokens"] == 9
    finally:
        await rep.close()


async def test_bad_worker_frames_are_counted_and_ignored(
    mock: ControllerProcess, api: httpx.AsyncClient
) -> None:
    ctx = zmq.asyncio.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{mock.ports['pull']}")
        for frame in (b"\xc1junk", b'{"type": "BatchedKVOperationMsg"}', b"{not json"):
            await push.send(frame)
        deadline = time.monotonic() + 5
        while "kvgate_mock_lmcache_bad_frames_total 3" not in (await api.get("/metrics")).text:
            assert time.monotonic() < deadline, "bad frames not counted"
            await asyncio.sleep(0.02)
    finally:
        ctx.destroy(linger=1000)
    assert await lookup_status(api) == 200


def test_faults_from_start_flags(tmp_path_factory: pytest.TempPathFactory) -> None:
    ctl = start_mock_controller(tmp_path_factory.mktemp("mock-flags"), "--error-rate", "1",
                                "--fault-paths", "/lookup", "--no-evict")  # fmt: skip
    try:
        with httpx.Client(base_url=ctl.url, timeout=5) as client:
            resp = client.post("/lookup", json={"tokens": [1]})
            assert resp.status_code == 500 and resp.json()["detail"] == "injected fault"
            assert (
                client.post("/evict", json={"tokens": [1], "instance_id": "a"}).status_code == 404
            )
            faults = client.get("/admin/faults").json()
            assert faults["error_rate"] == 1 and faults["paths"] == ["/lookup"]
    finally:
        ctl.stop()


@pytest.mark.parametrize(
    "argv",
    [["--monitor-ports", "not json"], ["--monitor-ports", '{"pull": 1}'], ["--error-rate", "2"],
     ["--monitor-port", "9001"]],
)  # fmt: skip
def test_bad_flags_exit_with_a_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = cli_main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert "mock-lmcache" in capsys.readouterr().err


async def test_mock_pull_loop_survives_a_deeply_nested_json_frame(tmp_path: Path) -> None:
    """The frame's RecursionError used to end the mock's pull loop: no admit counted after it."""
    ctl = start_mock_controller(tmp_path)
    ctx = zmq.asyncio.Context()
    rep = WorkerReporter(controller_host="127.0.0.1", ports=ctl.ports, instance_id="deep",
                         handler=RecordingHandler(), heartbeat_interval=0.5)
    try:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(f"tcp://127.0.0.1:{ctl.ports['pull']}")
        await push.send(b'{"type": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        await rep.start()
        assert await rep.wait_registered(10)
        tokens = list(range(7, 7 + 512))
        rep.admit(chunk_keys(tokens))
        async with httpx.AsyncClient(base_url=ctl.url, timeout=10) as client:
            await wait_for_layout(client, tokens, {"deep": ["LocalCPUBackend", 512]})
    finally:
        await rep.close()
        ctx.destroy(linger=0)
        ctl.stop()
