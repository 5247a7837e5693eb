"""A real `kvgate sim-vllm` process publishes KV events that KVEventSubscriber follows, across a restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from kvproto.kv_events import AllBlocksCleared, BlockStored, KVEventBatch
from kvproto.kv_events_sub import KVEventSubscriber
from testbed.procs import ManagedProcess, free_ports, start_kvgate


async def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _start_sim(log_dir: Path, http_port: int, events_port: int, replay_port: int) -> ManagedProcess:
    sim = start_kvgate("sim-events", [
        "sim-vllm", "--id", "sim-events", "--port", str(http_port), "--prefill-rate", "100000",
        "--kv-events-port", str(events_port), "--kv-events-replay-port", str(replay_port),
    ], log_dir)
    sim.wait_http(f"http://127.0.0.1:{http_port}/health")
    return sim


async def test_completion_blocks_arrive_and_a_restart_resets(tmp_path: Path) -> None:
    http_port, events_port, replay_port = free_ports(3)
    base = f"http://127.0.0.1:{http_port}"
    batches: list[KVEventBatch] = []
    resets: list[int] = []
    sim = _start_sim(tmp_path, http_port, events_port, replay_port)
    sub: KVEventSubscriber | None = None
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            info = (await http.get(f"{base}/kvgate/kv-events")).json()
            assert info["enabled"] and (info["port"], info["replay_port"]) == (events_port, replay_port)
            sub = KVEventSubscriber(info["endpoint"], info["replay_endpoint"], on_batch=batches.append,
                                    on_reset=lambda: resets.append(len(batches)))
            await sub.start()

            prompt = list(range(1000, 1040))  # 2 full blocks of 16 and a partial one
            resp = await http.post(f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": 2})
            assert resp.status_code == 200, resp.text

            def stored_tokens() -> list[int]:
                return [t for b in batches for e in b.events if isinstance(e, BlockStored) for t in e.token_ids]

            await wait_for(lambda: len(stored_tokens()) >= 32, "BlockStored for the prompt's full blocks")
            stored = [e for b in batches for e in b.events if isinstance(e, BlockStored)]
            assert stored_tokens() == prompt[:32]
            assert stored[0].parent_block_hash is None and stored[0].block_size == 16
            assert len({h for e in stored for h in e.block_hashes}) == 2
            assert resets == []

            await http.post(f"{base}/reset_prefix_cache")
            await wait_for(lambda: any(isinstance(e, AllBlocksCleared) for b in batches for e in b.events),
                           "AllBlocksCleared after a prefix-cache reset")

            sim.stop()
            await wait_for(lambda: sub is not None and sub.stats.disconnects, "the subscriber to see the sim go")
            sim = _start_sim(tmp_path, http_port, events_port, replay_port)
            await wait_for(lambda: resets, "on_reset after the sim restarted")
            assert resets == [len(batches)]  # before any event of the new process
            resp = await http.post(f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": 1})
            assert resp.status_code == 200
            await wait_for(lambda: len(batches) > resets[0], "the restarted sim's events")
            assert isinstance(batches[resets[0]].events[0], BlockStored)
    finally:
        if sub is not None:
            await sub.close()
        sim.stop()
