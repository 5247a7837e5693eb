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
        assert _log(proc).count("kvgate stopped") == 2
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
        # /healthz answers once one worker listens; the spread below needs both.
        await wait_until(lambda: _log(proc).count("kvgate listening") == 2, timeout=30)
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


def _blocked_signals(pid: int) -> int:
    """The signal mask of a process's main thread, from /proc (bit n-1 = signal n)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    return 0


async def test_a_sighup_during_start_up_is_applied_later_instead_of_killing_the_workers(tmp_path: Path) -> None:
    """A reload asked for while the parent forks its workers (or they build their apps) is held,
    not fatal: SIGHUP's default disposition would end the process."""
    backend = await start_backend(FakeBackend("a"))
    port = free_port()
    proc = _gateway_process(tmp_path, backend.port, port, extra_server=", workers: 2")
    try:
        pid = proc.proc.pid
        await wait_until(lambda: not proc.alive() or _blocked_signals(pid) & (1 << (signal.SIGTERM - 1)) != 0,
                         timeout=30)
        assert proc.alive(), proc.log_tail()
        sent = 0
        while _log(proc).count("kvgate listening") < 2 and proc.alive():
            proc.signal(signal.SIGHUP)  # start-up is under way: every one lands in it
            sent += 1
            await asyncio.sleep(0.01)
        assert proc.alive() and sent > 0, proc.log_tail()
        await asyncio.to_thread(proc.wait_http, f"http://127.0.0.1:{port}/healthz", 30)
        await wait_until(lambda: "config reloaded" in _log(proc), timeout=30)  # the held reload ran
        assert (await asyncio.to_thread(proc.stop, 15)) == 0, proc.log_tail()
        assert _log(proc).count("kvgate stopped") == 2
    finally:
        proc.kill()
        await backend.close()


def _log(proc: ManagedProcess) -> str:
    return proc.log_path.read_text(errors="replace")


async def test_shutdown_steps_share_one_drain_deadline(tmp_path: Path) -> None:
    """The background queue's close gets what is left of `drain_timeout`, not a fresh one."""
    from gateway.app import create_app
    from gateway.config import load_config_text
    from gateway.state import STATE_KEY

    config = load_config_text(gateway_yaml({"a": free_port()}, tmp_path / "access.jsonl",
                                           server=", drain_timeout: 30s"))
    state = create_app(config, monitor=False)[STATE_KEY]
    assert state.drain_time_left(30.0) == 30.0  # not draining: the full timeout
    now = asyncio.get_running_loop().time()
    state.drain_deadline = now + 2.0
    assert 0.5 <= state.drain_time_left(30.0) <= 2.0
    state.drain_deadline = now - 5.0  # past the deadline: only the short grace
    assert state.drain_time_left(30.0) == 0.5
