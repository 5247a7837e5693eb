"""`kvgate serve` as a real process: SIGTERM drains in-flight streams; workers share the port."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from testbed.fake_openai import FakeBackend
from testbed.procs import ManagedProcess, free_port, start_kvgate
from tests.conftest import wait_until
from tests.gateway.harness import gateway_yaml, start_backend


def _gateway_process(tmp_path: Path, backend_port: int, port: int, extra_server: str = "") -> ManagedProcess:
    config = tmp_path / "gw.yaml"
    text = gateway_yaml({"a": backend_port}, tmp_path / "access.jsonl", server=extra_server)
    config.write_text(text.replace("port: 0,", f"port: {port},", 1))
    return start_kvgate("gateway", ["serve", "-c", str(config)], tmp_path)


async def test_sigterm_drains_an_in_flight_stream_then_exits(tmp_path: Path) -> None:
    gate = asyncio.Event()
    fake = FakeBackend("a", stream_gate=gate)
    backend = await start_backend(fake)
    port = free_port()
    proc = _gateway_process(tmp_path, backend.port, port)
    try:
        await asyncio.to_thread(proc.wait_http, f"http://127.0.0.1:{port}/healthz", 30)
        async with aiohttp.ClientSession() as session:
            body = {"model": "m", "prompt": "hi", "stream": True}
            async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as resp:
                await resp.content.readuntil(b"\n\n")
                proc.signal(signal.SIGTERM)
                # New connections are refused while the stream is still being served.
                async def refused() -> bool:
                    try:
                        async with aiohttp.ClientSession() as other:
                            await other.get(f"http://127.0.0.1:{port}/healthz")
                        return False
                    except aiohttp.ClientConnectionError:
                        return True
                deadline = asyncio.get_running_loop().time() + 10
                while not await refused():
                    assert asyncio.get_running_loop().time() < deadline, "listener not closed"
                    await asyncio.sleep(0.05)
                assert proc.alive()
                gate.set()
                rest = await resp.read()
        assert rest.endswith(b"data: [DONE]\n\n")
        code = await asyncio.to_thread(proc.stop, 15)
        assert code == 0, proc.log_tail()
        assert "kvgate stopped" in proc.log_tail()
    finally:
        proc.kill()
        await backend.close()


async def test_two_workers_share_the_port(tmp_path: Path) -> None:
    backend = await start_backend(FakeBackend("a"))
    port = free_port()
    proc = _gateway_process(tmp_path, backend.port, port, extra_server=", workers: 2")
    try:
        await asyncio.to_thread(proc.wait_http, f"http://127.0.0.1:{port}/healthz", 30)
        statuses = []
        for _ in range(20):  # new connection each time: the kernel spreads them over both workers
            async with aiohttp.ClientSession() as session:
                async with session.post(f"http://127.0.0.1:{port}/v1/completions",
                                        json={"model": "m", "prompt": "x"}) as resp:
                    statuses.append(resp.status)
        assert statuses == [200] * 20
        assert (await asyncio.to_thread(proc.stop, 15)) == 0
        assert proc.log_tail().count("kvgate stopped") == 2
    finally:
        proc.kill()
        await backend.close()


def test_gateway_process_tunes_the_cyclic_collector() -> None:
    import subprocess
    import sys

    code = ("import gc; from gateway.serve import tune_gc; tune_gc(); "
            "print(gc.get_threshold()[0], gc.get_freeze_count() > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["7000", "True"]


async def test_a_second_sigterm_during_shutdown_still_exits_cleanly(tmp_path: Path) -> None:
    backend = await start_backend(FakeBackend("a"))
    port = free_port()
    proc = _gateway_process(tmp_path, backend.port, port)
    try:
        await asyncio.to_thread(proc.wait_http, f"http://127.0.0.1:{port}/healthz", 30)
        proc.signal(signal.SIGTERM)
        await asyncio.to_thread(_wait_for_log, proc, "kvgate stopped")
        proc.signal(signal.SIGTERM)  # lands during interpreter teardown, if it is still running
        assert (await asyncio.to_thread(proc.stop, 15)) == 0, proc.log_tail()
    finally:
        proc.kill()
        await backend.close()


def _wait_for_log(proc: ManagedProcess, text: str, timeout: float = 15.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while text not in proc.log_tail() and proc.alive():
        assert time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.01)


def _requests_total(text: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("kvgate_requests_total{") and 'status="200"' in line)


async def test_two_workers_expose_one_consistent_metrics(tmp_path: Path) -> None:
    backend = await start_backend(FakeBackend("a"))
    port = free_port()
    config = tmp_path / "gw.yaml"
    text = gateway_yaml({"a": backend.port}, tmp_path / "access.jsonl", server=", workers: 2")
    config.write_text(text.replace("port: 0,", f"port: {port},", 1))
    metrics_tmp = tmp_path / "tmp"
    metrics_tmp.mkdir()
    proc = start_kvgate("gateway", ["serve", "-c", str(config)], tmp_path, env={"TMPDIR": str(metrics_tmp)})
    url = f"http://127.0.0.1:{port}"
    sent = 30
    try:
        await asyncio.to_thread(proc.wait_http, url + "/healthz", 30)
        for _ in range(sent):  # a new connection each time: the kernel spreads them over both workers
            async with aiohttp.ClientSession() as session:
                async with session.post(url + "/v1/completions", json={"model": "m", "prompt": "x"}) as resp:
                    assert resp.status == 200
        (metrics_dir,) = metrics_tmp.iterdir()  # the fresh directory `kvgate serve` made
        workers_counting = {p.name for p in metrics_dir.glob("counter_*.db")}
        assert len(workers_counting) == 2, workers_counting  # both workers served requests

        async def scrape() -> str:
            async with aiohttp.ClientSession() as session:  # new connection: either worker answers
                async with session.get(url + "/metrics") as resp:
                    return await resp.text()

        await wait_until(lambda: _scraped_total(scrape, sent), message=f"{sent} requests in /metrics")
        scrapes = [await scrape() for _ in range(8)]
        assert [_requests_total(s) for s in scrapes] == [sent] * 8
        assert all('kvgate_endpoint_healthy{endpoint="a"} 1.0' in s for s in scrapes)  # livemin: no pid label
        assert (await asyncio.to_thread(proc.stop, 15)) == 0
        assert not metrics_dir.exists()  # removed on exit
    finally:
        proc.kill()
        await backend.close()


async def _scraped_total(scrape: Callable[[], Awaitable[str]], want: int) -> bool:
    return _requests_total(await scrape()) == want
