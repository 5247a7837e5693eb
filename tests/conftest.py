"""Shared fixtures: the tests start real aiohttp servers on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0,
                     interval: float = 0.02, message: str = "condition") -> None:
    """Poll `predicate` until true or fail after `timeout` seconds (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny model directory (tokenizer.json + chat template + MLX weights)."""
    from mlxd.tiny_model import write_model

    return write_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)
