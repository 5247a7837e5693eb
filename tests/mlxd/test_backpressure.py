"""Bounded queue: a daemon with one batch slot and one waiting place answers 429 beyond that."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import wait_until
from tests.mlxd.conftest import Daemon, start_daemon
from tests.mlxd.test_server import metric_values

LONG = {"prompt": "Keep going", "max_tokens": 8000, "stream": True, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def narrow_daemon(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tiny_model_dir, tmp_path_factory.mktemp("logs"), "mlx-narrow",
                     "--max-running", "1", "--max-waiting", "1")
    yield d
    d.proc.stop()


async def _gauges(daemon: Daemon) -> tuple[float, float]:
    values = await metric_values(daemon)
    return values["vllm:num_requests_running"], values["vllm:num_requests_waiting"]


async def test_full_queue_answers_429_with_retry_after_then_recovers(narrow_daemon: Daemon) -> None:
    d = narrow_daemon
    async with aiohttp.ClientSession() as s:
        running = await s.post(d.url + "/v1/completions", json=LONG)
        await running.content.readline()
        waiting = await s.post(d.url + "/v1/completions", json=LONG)
        await wait_until(lambda: _is(d, (1, 1)), timeout=10, message="one running, one waiting")
        async with s.post(d.url + "/v1/completions", json={**LONG, "stream": False}) as r:
            assert r.status == 429
            assert int(r.headers["Retry-After"]) >= 1
            error = (await r.json())["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert (await metric_values(d))["mlxd_requests_rejected_total"] >= 1
        running.close()
        await waiting.content.readline()  # the waiting request got the freed slot
        waiting.close()
        await wait_until(lambda: _is(d, (0, 0)), timeout=10, message="queue drained")
        async with s.post(d.url + "/v1/completions", json={"prompt": "after", "max_tokens": 2}) as r:
            assert r.status == 200


async def _is(daemon: Daemon, expected: tuple[int, int]) -> bool:
    return await _gauges(daemon) == expected
