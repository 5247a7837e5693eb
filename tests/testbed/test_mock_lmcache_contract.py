"""Contract tests: the same assertions against the mock and, when KVGATE_REAL_LMCACHE names a
real `lmcache_controller` executable, against the real LMCache controller.

Workers are kvproto.WorkerReporter instances with a RecordingHandler, so these tests
also check that our worker side is accepted by the real controller.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import zmq
import zmq.asyncio

from kvproto.chunks import chunk_keys
from kvproto.messages import encode_json, kv_ops, make
from kvproto.worker import WorkerReporter
from testbed.mock_lmcache.harness import (
    ControllerProcess,
    RecordingHandler,
    start_mock_controller,
    start_real_controller,
    wait_for_layout,
)

LOC = "LocalCPUBackend"
REAL = os.environ.get("KVGATE_REAL_LMCACHE")


@pytest.fixture(scope="module", params=["mock", "real"])
def controller(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControllerProcess]:
    logs = tmp_path_factory.mktemp("lmcache-logs")
    if request.param == "real":
        if not REAL:
            pytest.skip("KVGATE_REAL_LMCACHE is not set to a real lmcache_controller executable")
        ctl = start_real_controller(REAL, logs)
    else:
        ctl = start_mock_controller(logs)
    yield ctl
    ctl.stop()


@pytest.fixture
async def client(controller: ControllerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=controller.url, timeout=10) as c:
        yield c


class Workers:
    """Starts WorkerReporters against the controller; closes them all at the end."""

    def __init__(self, controller: ControllerProcess) -> None:
        self.controller = controller
        self.started: list[WorkerReporter] = []

    async def start(self, instance_id: str, handler: RecordingHandler | None = None,
                    worker_id: int = 0) -> WorkerReporter:  # fmt: skip
        rep = WorkerReporter(controller_host="127.0.0.1", ports=self.controller.ports,
                             instance_id=instance_id, handler=handler or RecordingHandler(),
                             worker_id=worker_id, heartbeat_interval=0.5)  # fmt: skip
        await rep.start()
        self.started.append(rep)
        assert await rep.wait_registered(10), f"{instance_id} did not register"
        return rep


@pytest.fixture
async def workers(controller: ControllerProcess) -> AsyncIterator[Workers]:
    pool = Workers(controller)
    yield pool
    for rep in pool.started:
        await rep.close()


def fresh_tokens(n: int) -> list[int]:
    """Tokens no other test uses, so first-registered crediting cannot leak between tests."""
    base = random.randrange(1_000_000, 2**31)
    return [base + i for i in range(n)]


def uid(prefix: str) -> str:
    return f"{prefix}-{random.randrange(10**9)}"


async def test_lookup_of_unknown_tokens_is_empty(client: httpx.AsyncClient) -> None:
    resp = await client.post("/lookup", json={"tokens": fresh_tokens(600)})
    assert resp.status_code == 200
    body = resp.json()
    assert body["layout_info"] == {} and isinstance(body["event_id"], str) and body["event_id"]


async def test_prefix_walk_over_full_chunks(client: httpx.AsyncClient, workers: Workers) -> None:
    tokens = fresh_tokens(3 * 256 + 100)
    rep = await workers.start(uid("walk"))
    rep.admit(chunk_keys(tokens))
    await wait_for_layout(client, tokens, {rep.instance_id: [LOC, 768]})
    # a prompt that ends mid-chunk is credited up to the last full chunk it shares
    await wait_for_layout(client, tokens[:600], {rep.instance_id: [LOC, 512]})
    # shorter than one chunk never matches
    await wait_for_layout(client, tokens[:255], {})
    rep.evict(chunk_keys(tokens)[1:2])  # a hole at chunk 1 stops the walk there
    await wait_for_layout(client, tokens, {rep.instance_id: [LOC, 256]})


async def test_chunks_are_credited_to_the_first_registered_holder(
    client: httpx.AsyncClient, workers: Workers
) -> None:
    tokens = fresh_tokens(3 * 256)
    keys = chunk_keys(tokens)
    first = await workers.start(uid("first"))
    second = await workers.start(uid("second"))
    second.admit(keys)
    await wait_for_layout(client, tokens, {second.instance_id: [LOC, 768]})
    first.admit(keys[:2])
    await wait_for_layout(
        client, tokens, {first.instance_id: [LOC, 512], second.instance_id: [LOC, 768]}
    )
    second.evict(keys[2:])
    await wait_for_layout(client, tokens, {first.instance_id: [LOC, 512]})


async def test_json_frames_on_the_pull_socket(
    client: httpx.AsyncClient, workers: Workers, controller: ControllerProcess
) -> None:
    tokens = fresh_tokens(256)
    rep = await workers.start(uid("json"))
    msg = make("BatchedKVOperationMsg", instance_id=rep.instance_id, worker_id=0, location=LOC,
               operations=kv_ops("admit", chunk_keys(tokens), 0))  # fmt: skip
    ctx = zmq.asyncio.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{controller.ports['pull']}")
        await push.send(encode_json(msg))
        await wait_for_layout(client, tokens, {rep.instance_id: [LOC, 256]})
    finally:
        ctx.destroy(linger=1000)


async def test_control_operations_reach_every_worker(
    client: httpx.AsyncClient, workers: Workers
) -> None:
    instance = uid("ctl")
    handlers = [RecordingHandler(results={"pin": 512, "clear": 3, "compress": 256, "decompress": 128,
                                          "health": 0}) for _ in range(2)]  # fmt: skip
    for wid, handler in enumerate(handlers):
        await workers.start(instance, handler, worker_id=wid)
    tokens = fresh_tokens(600)
    cases: list[tuple[str, dict[str, Any], int]] = [
        ("/pin", {"instance_id": instance, "location": LOC, "tokens": tokens}, 512),
        ("/clear", {"instance_id": instance, "location": LOC}, 3),
        (
            "/compress",
            {"instance_id": instance, "method": "cachegen", "location": LOC, "tokens": tokens},
            256,
        ),
        ("/decompress", {"instance_id": instance, "method": "cachegen", "location": LOC}, 128),
    ]
    for path, body, expected in cases:
        resp = await client.post(path, json=body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["num_tokens"] == expected and resp.json()["event_id"]
    for handler in handlers:
        assert handler.calls[0] == ("pin", tokens, LOC)
        assert handler.calls[1] == ("clear", LOC)
        assert handler.calls[2] == ("compress", tokens, "cachegen", LOC)
        assert handler.calls[3] == (
            "decompress",
            [],
            "cachegen",
            LOC,
        )  # omitted tokens arrive as []
    resp = await client.post("/health", json={"instance_id": instance})
    assert resp.status_code == 200
    assert resp.json()["error_codes"] == {"0": 0, "1": 0}


async def test_worker_failures_and_disagreement_are_http_500(
    client: httpx.AsyncClient, workers: Workers
) -> None:
    instance = uid("bad")
    await workers.start(instance, RecordingHandler(fail={"pin": RuntimeError("pin exploded")}))
    await workers.start(instance, RecordingHandler(results={"clear": 1}), worker_id=1)
    await workers.start(instance, RecordingHandler(results={"clear": 2}), worker_id=2)
    for path, body in [
        ("/pin", {"instance_id": instance, "location": LOC, "tokens": [1, 2]}),
        ("/clear", {"instance_id": instance, "location": LOC}),
        ("/pin", {"instance_id": uid("nobody"), "location": LOC, "tokens": [1]}),
    ]:
        resp = await client.post(path, json=body)
        assert resp.status_code == 500, (path, resp.text)
        assert isinstance(resp.json()["detail"], str)


@pytest.mark.parametrize(
    ("path", "body"),
    [("/lookup", {}), ("/lookup", {"tokens": "abc"}), ("/pin", {"instance_id": "x", "tokens": [1]}),
     ("/health", {}), ("/query_instance", {"ip": "127.0.0.1"})],
)  # fmt: skip
async def test_invalid_bodies_are_422_and_the_server_keeps_serving(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    resp = await client.post(path, json=body)
    assert resp.status_code == 422
    assert isinstance(resp.json()["detail"], list)
    assert (await client.post("/lookup", json={"tokens": [1, 2, 3]})).status_code == 200


async def test_worker_queries(client: httpx.AsyncClient, workers: Workers) -> None:
    rep = await workers.start(uid("query"))
    rep.admit(chunk_keys(fresh_tokens(512)))
    assert await rep.flush(5)
    resp = await client.post("/query_worker_info", json={"instance_id": rep.instance_id})
    assert resp.status_code == 200
    (info,) = resp.json()["worker_infos"]
    assert (info["instance_id"], info["worker_id"], info["ip"], info["port"], info["peer_init_url"]) == (
        rep.instance_id, 0, "127.0.0.1", rep.control_port, None)  # fmt: skip
    # "all" comes from a list LMCache caches for 30 s: it may lag, but has the same shape
    everyone = (await client.post("/query_worker_info", json={"instance_id": "all"})).json()[
        "worker_infos"
    ]
    assert all(set(w) == set(info) for w in everyone)
    resp = await client.post("/query_instance", json={"event_id": "q1", "ip": "127.0.0.1"})
    assert resp.status_code == 200 and isinstance(resp.json()["res"], str)
    resp = await client.post("/query_instance", json={"event_id": "q2", "ip": "192.0.2.1"})
    assert resp.status_code == 500
    workers_resp = await client.get("/controller/workers", params={"instance_id": rep.instance_id})
    row = workers_resp.json()["workers"][0]
    assert row["port"] == rep.control_port
    stats = (await client.get("/controller/key-stats")).json()
    mine = [i for i in stats["instances"] if i["instance_id"] == rep.instance_id]
    assert mine and mine[0]["worker_count"] == 1
    missing = await client.get(
        "/controller/workers", params={"instance_id": uid("ghost"), "worker_id": 0}
    )
    assert missing.status_code == 404
    metrics = (await client.get("/metrics")).text
    assert "lmcache:cache_controller_registered_workers_count" in metrics


async def test_reregistration_clears_keys_and_deregistration_removes_the_instance(
    client: httpx.AsyncClient, workers: Workers
) -> None:
    tokens = fresh_tokens(512)
    instance = uid("rereg")
    rep = await workers.start(instance)
    rep.admit(chunk_keys(tokens))
    await wait_for_layout(client, tokens, {instance: [LOC, 512]})
    # a second worker process claiming the same (instance, worker) registers again: keys cleared
    twin = await workers.start(instance)
    await wait_for_layout(client, tokens, {})
    await rep.close()  # DeRegisterMsg; the twin's own one then finds nothing to remove
    await twin.close()
    deadline = time.monotonic() + 10
    while (
        await client.get("/controller/workers", params={"instance_id": instance})
    ).status_code != 404:
        assert time.monotonic() < deadline, "instance still listed after deregistration"
        await asyncio.sleep(0.02)


async def test_evict_endpoint_is_absent_or_drops_chunks(
    client: httpx.AsyncClient, workers: Workers, controller: ControllerProcess
) -> None:
    tokens = fresh_tokens(512)
    rep = await workers.start(uid("evict"))
    rep.admit(chunk_keys(tokens))
    await wait_for_layout(client, tokens, {rep.instance_id: [LOC, 512]})
    resp = await client.post(
        "/evict", json={"tokens": tokens[256:], "instance_id": rep.instance_id}
    )
    if controller.kind == "real":
        assert resp.status_code == 404  # there is no /evict in LMCache
        return
    # the mock's /evict drops the instance's chunks of these tokens; a suffix on its own
    # hashes to a different chain, so it matches nothing
    assert resp.status_code == 200, resp.text
    assert resp.json()["num_tokens"] == 0
    resp = await client.post("/evict", json={"tokens": tokens, "instance_id": rep.instance_id})
    assert resp.json()["num_tokens"] == 512
    await wait_for_layout(client, tokens, {})


@pytest.mark.parametrize("kind", ["mock", "real"])
async def test_workers_come_back_after_a_controller_restart(
    kind: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A restarted controller has lost every key; reporters re-register and re-send theirs."""
    if kind == "real" and not REAL:
        pytest.skip("KVGATE_REAL_LMCACHE is not set to a real lmcache_controller executable")
    logs = tmp_path_factory.mktemp("restart")
    ctl = (
        start_real_controller(REAL, logs)
        if kind == "real" and REAL
        else start_mock_controller(logs)
    )
    tokens = fresh_tokens(512)
    pool = Workers(ctl)
    try:
        rep = await pool.start(uid("restart"))
        rep.admit(chunk_keys(tokens))
        async with httpx.AsyncClient(base_url=ctl.url, timeout=10) as client:
            await wait_for_layout(client, tokens, {rep.instance_id: [LOC, 512]})
        await asyncio.to_thread(ctl.restart)
        async with httpx.AsyncClient(base_url=ctl.url, timeout=10) as client:
            await wait_for_layout(client, tokens, {rep.instance_id: [LOC, 512]}, within=20)
        assert rep.stats["resyncs"] >= 2
    finally:
        for started in pool.started:
            await started.close()
        ctl.stop()


def test_controller_answers_a_deeply_nested_body_with_400_detail(controller: ControllerProcess) -> None:  # noqa: F811
    """FastAPI (the real controller) answers 400 {"detail"}; the mock used to answer a text 500."""
    deep = b'{"tokens": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp = httpx.post(controller.url + "/lookup", content=deep, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400
    assert resp.json() == {"detail": "There was an error parsing the body"}
    assert httpx.post(controller.url + "/lookup", json={"tokens": [1, 2]}).status_code == 200
