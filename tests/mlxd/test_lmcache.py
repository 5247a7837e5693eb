"""The daemon as an LMCache worker, against the mock controller (`kvgate mock-lmcache`).

Admits appear in the controller's /lookup when the cache fills, evictions remove
them, and the controller's pin / compress / decompress / health reach the cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from testbed.mock_lmcache.harness import (
    ControllerProcess,
    start_mock_controller,
    start_real_controller,
    wait_for_layout,
)
from testbed.procs import free_ports
from tests.mlxd.conftest import Daemon, start_daemon

LOC = "LocalCPUBackend"
CHUNK = 256
REAL = os.environ.get("KVGATE_REAL_LMCACHE")


@pytest.fixture(scope="module", params=["mock", "real"])
def controller(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    """The mock, and the real `lmcache_controller` when KVGATE_REAL_LMCACHE names it."""
    logs = tmp_path_factory.mktemp("ctl-logs")
    if request.param == "real":
        if not REAL:
            pytest.skip("KVGATE_REAL_LMCACHE is not set to a real lmcache_controller executable")
        ctl = start_real_controller(REAL, logs)
    else:
        ctl = start_mock_controller(logs)
    yield ctl
    ctl.stop()


def method_for(ctl: ControllerProcess) -> str:
    """The real controller forwards only "cachegen" (the daemon treats it as zstd)."""
    return "cachegen" if ctl.kind == "real" else "zstd"


@pytest.fixture(scope="module")
def worker(tiny_model_dir: Path, controller: ControllerProcess,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tiny_model_dir, tmp_path_factory.mktemp("logs"), "mlx-worker",
                     "--cache-tokens", "1600", "--cold-cache-tokens", "1600",
                     "--lmcache-controller", "127.0.0.1", "--lmcache-ports", json.dumps(controller.ports))
    yield d
    d.proc.stop()


@pytest.fixture
async def ctl_client(controller: ControllerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=controller.url, timeout=10) as client:
        yield client


def conversation(seed: int) -> list[dict[str, str]]:
    """A chat whose rendered prompt is ~600 tokens, distinct per seed from the first token on."""
    words = " ".join(f"w{(seed * 7919 + i * 31) % 997}" for i in range(260))
    return [{"role": "system", "content": f"{seed}: {words}"}, {"role": "user", "content": "Summarise."}]


async def run_chat(d: Daemon, messages: list[dict[str, str]]) -> tuple[list[int], dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.post(d.url + "/tokenize", json={"messages": messages}) as r:
            ids = (await r.json())["tokens"]
        body = {"messages": messages, "max_tokens": 2, "temperature": 0, "ignore_eos": True}
        async with s.post(d.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            return ids, (await r.json())["usage"]


async def cache_stats(d: Daemon) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(d.url + "/cache/stats") as r:
        return dict(await r.json())


def full_chunks(ids: list[int]) -> int:
    return len(ids) // CHUNK * CHUNK


async def test_worker_protocol_end_to_end(worker: Daemon, controller: ControllerProcess,
                                          ctl_client: httpx.AsyncClient) -> None:
    iid = worker.instance_id
    # admit on fill: the prompt's full chunks become visible to /lookup
    pinned_ids, _ = await run_chat(worker, conversation(1))
    assert len(pinned_ids) >= 2 * CHUNK
    await wait_for_layout(ctl_client, pinned_ids, {iid: [LOC, full_chunks(pinned_ids)]})

    # pin acts on the cache
    r = await ctl_client.post("/pin", json={"instance_id": iid, "location": LOC, "tokens": pinned_ids})
    assert r.status_code == 200 and r.json()["num_tokens"] == len(pinned_ids)
    assert (await cache_stats(worker))["pinned_tokens"] == len(pinned_ids)

    # compress moves an entry to the zstd tier; the next hit restores it
    other_ids, _ = await run_chat(worker, conversation(2))
    r = await ctl_client.post("/compress", json={"instance_id": iid, "location": LOC,
                                                 "method": method_for(controller), "tokens": other_ids})
    assert r.status_code == 200 and r.json()["num_tokens"] == len(other_ids)
    stats = await cache_stats(worker)
    assert stats["cold_tokens"] >= len(other_ids) and stats["cold_bytes"] > 0
    _, usage = await run_chat(worker, conversation(2))
    assert usage["prompt_tokens_details"]["cached_tokens"] == len(other_ids) - 1
    assert (await cache_stats(worker))["restores"] == 1

    # evict on eviction: more prompts than both tiers hold push out the unpinned ones
    for seed in range(3, 9):
        await run_chat(worker, conversation(seed))
    await wait_for_layout(ctl_client, other_ids, {})
    await wait_for_layout(ctl_client, pinned_ids, {iid: [LOC, full_chunks(pinned_ids)]})
    _, usage = await run_chat(worker, conversation(1))
    assert usage["prompt_tokens_details"]["cached_tokens"] == len(pinned_ids) - 1

    r = await ctl_client.post("/health", json={"instance_id": iid})
    assert r.json()["error_codes"] == {"0": 0}


async def test_unknown_compression_method_is_an_error_not_a_crash(
        worker: Daemon, controller: ControllerProcess, ctl_client: httpx.AsyncClient) -> None:
    r = await ctl_client.post("/compress", json={"instance_id": worker.instance_id, "location": LOC,
                                                 "method": "lz4", "tokens": [1, 2, 3]})
    assert r.status_code == 500
    if controller.kind == "mock":  # the real controller replaces the worker's error text with its own
        assert "lz4" in r.json()["detail"]
    r = await ctl_client.post("/health", json={"instance_id": worker.instance_id})
    assert r.json()["error_codes"] == {"0": 0}


async def test_clear_empties_the_cache_and_the_index(worker: Daemon, ctl_client: httpx.AsyncClient) -> None:
    ids, _ = await run_chat(worker, conversation(42))
    await wait_for_layout(ctl_client, ids, {worker.instance_id: [LOC, full_chunks(ids)]})
    r = await ctl_client.post("/clear", json={"instance_id": worker.instance_id, "location": LOC})
    assert r.status_code == 200 and r.json()["num_tokens"] > 0
    assert (await cache_stats(worker))["entries"] == 0
    await wait_for_layout(ctl_client, ids, {})


def test_dead_controller_does_not_affect_serving(tiny_model_dir: Path,
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    pull, reply, heartbeat = free_ports(3)  # nothing listens there
    ports = {"pull": pull, "reply": reply, "heartbeat": heartbeat}
    d = start_daemon(tiny_model_dir, tmp_path_factory.mktemp("logs"), "mlx-orphan",
                     "--lmcache-controller", "127.0.0.1", "--lmcache-ports", json.dumps(ports))
    try:
        for seed in (1, 1):
            body = {"messages": conversation(seed), "max_tokens": 2, "temperature": 0}
            with httpx.Client(base_url=d.url, timeout=30) as client:
                r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        with httpx.Client(base_url=d.url) as client:
            metrics = client.get("/metrics").text
        assert 'mlxd_lmcache_registered{model_name="tiny"} 0.0' in metrics
    finally:
        d.proc.stop()
