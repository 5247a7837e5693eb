"""A real `kvgate mlx-serve` (seeded tiny model) publishes its prefix cache as vLLM KV events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from kvproto.kv_events import BlockStored, KVEventBatch
from kvproto.kv_events_sub import KVEventSubscriber
from tests.mlxd.conftest import start_daemon

PROMPT = "The quick brown fox jumps over the lazy dog. " * 6


async def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_prompt_blocks_are_published(tiny_model_dir: Path, tmp_path: Path) -> None:
    daemon = start_daemon(tiny_model_dir, tmp_path, "mlx-events", "--kv-events-port", "0",
                          "--kv-events-replay-port", "0")
    batches: list[KVEventBatch] = []
    sub: KVEventSubscriber | None = None
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            info = (await http.get(f"{daemon.url}/kvgate/kv-events")).json()
            assert info["enabled"] and info["port"] > 0 and info["replay_port"] > 0
            sub = KVEventSubscriber(info["endpoint"], info["replay_endpoint"], on_batch=batches.append,
                                    on_reset=lambda: None)
            await sub.start()
            ids = (await http.post(f"{daemon.url}/tokenize", json={"prompt": PROMPT})).json()["tokens"]
            full = len(ids) // 16 * 16
            assert full >= 32
            resp = await http.post(f"{daemon.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
            assert resp.status_code == 200, resp.text

            def chain() -> list[int]:
                """Tokens of the stored blocks, in order, from the first root block."""
                stored = [e for b in batches for e in b.events if isinstance(e, BlockStored)]
                return [t for e in stored for t in e.token_ids]

            await wait_for(lambda: len(chain()) >= full, "BlockStored covering the prompt's full blocks")
            first = next(e for b in batches for e in b.events if isinstance(e, BlockStored))
            assert first.parent_block_hash is None and first.block_size == 16
            assert chain()[:full] == ids[:full]
    finally:
        if sub is not None:
            await sub.close()
        daemon.proc.stop()
