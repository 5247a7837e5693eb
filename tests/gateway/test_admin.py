"""The admin side in each mode: a separate listener, a key on the traffic port, or open
(with a warning); and `kvgate serve` with an admin listener reloading on SIGHUP."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from filters.auth import hash_key
from gateway.admin import create_admin_app
from testbed.fake_openai import FakeBackend
from testbed.procs import free_port, start_kvgate
from tests.conftest import wait_until
from tests.gateway.harness import gateway_yaml, start_backend, start_gateway

ADMIN_PATHS = (("GET", "/metrics"), ("GET", "/kvgate/status"), ("POST", "/admin/reload"))


async def _status(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict | str]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, headers=headers or {}) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text


@pytest.fixture
async def backend_port() -> int:  # type: ignore[misc]
    server = await start_backend(FakeBackend("a"))
    yield server.port
    await server.close()


async def test_without_admin_config_the_endpoints_stay_open_with_one_warning(
        tmp_path: Path, backend_port: int, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvgate.admin"):
        gw = await start_gateway(gateway_yaml({"a": backend_port}, tmp_path / "log"))
    try:
        warnings = [r for r in caplog.records if r.name == "kvgate.admin"]
        assert len(warnings) == 1 and "open on the traffic port" in warnings[0].getMessage()
        assert (await _status(f"http://127.0.0.1:{gw.port}/metrics"))[0] == 200
        assert (await _status(f"http://127.0.0.1:{gw.port}/kvgate/status"))[0] == 200
    finally:
        await gw.close()


async def test_an_admin_key_guards_the_admin_endpoints_on_the_traffic_port(
        tmp_path: Path, backend_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVGATE_TEST_ADMIN_KEY", "admin-secret-42")
    gw = await start_gateway(gateway_yaml({"a": backend_port}, tmp_path / "log",
                                          server=", admin_key_env: KVGATE_TEST_ADMIN_KEY"))
    base = f"http://127.0.0.1:{gw.port}"
    try:
        for method, path in ADMIN_PATHS:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-admin-key": "admin-secret-4"}):
                status, body = await _status(base + path, method, headers)
                assert status == 401, (path, headers)
                assert isinstance(body, dict) and body["error"]["code"] == "invalid_admin_key"
        assert (await _status(base + "/metrics", headers={"Authorization": "Bearer admin-secret-42"}))[0] == 200
        assert (await _status(base + "/kvgate/status", headers={"x-admin-key": "admin-secret-42"}))[0] == 200
        # Not started from a file: the reload is refused, but only once the key was accepted.
        status, body = await _status(base + "/admin/reload", "POST", {"x-admin-key": "admin-secret-42"})
        assert status == 400 and "not started from a config file" in body["error"]["message"]  # type: ignore[index]
        assert (await _status(base + "/healthz"))[0] == 200  # probes stay open
        async with aiohttp.ClientSession() as session:
            async with session.post(base + "/v1/completions", json={"model": "m", "prompt": "x"}) as resp:
                assert resp.status == 200  # traffic needs no admin key
    finally:
        await gw.close()


async def test_an_unset_admin_key_variable_is_a_config_error(tmp_path: Path, backend_port: int) -> None:
    from kvkernel.decode import ConfigError

    with pytest.raises(ConfigError, match=r"server\.admin_key_env: environment variable KVGATE_UNSET_X"):
        await start_gateway(gateway_yaml({"a": backend_port}, tmp_path / "log",
                                         server=", admin_key_env: KVGATE_UNSET_X"))


async def test_a_separate_listener_serves_admin_and_the_traffic_port_does_not(tmp_path: Path,
                                                                             backend_port: int) -> None:
    gw = await start_gateway(gateway_yaml({"a": backend_port}, tmp_path / "log",
                                          server=", admin: {host: 127.0.0.1, port: 1}"))
    admin = TestServer(create_admin_app(gw.app), host="127.0.0.1")
    await admin.start_server()
    try:
        for method, path in ADMIN_PATHS[:2]:
            status, body = await _status(f"http://127.0.0.1:{gw.port}{path}", method)
            assert status == 404 and body["error"]["code"] == "route_not_found"  # type: ignore[index]
            assert (await _status(f"http://127.0.0.1:{admin.port}{path}", method))[0] == 200
        status, body = await _status(f"http://127.0.0.1:{admin.port}/kvgate/status")
        assert [e["id"] for e in body["endpoints"]] == ["a"]  # type: ignore[index]
    finally:
        await admin.close()
        await gw.close()


async def test_serve_with_an_admin_listener_reloads_on_sighup(tmp_path: Path, backend_port: int) -> None:
    port, admin_port = free_port(), free_port()
    keys = tmp_path / "keys"
    keys.write_text(f"old:{hash_key('sk-old')}\n")
    config = tmp_path / "gw.yaml"
    auth = f'  - type: auth\n    config: {{keys_file: "{keys}"}}\n'
    text = gateway_yaml({"a": backend_port}, tmp_path / "access.jsonl", extra_filters=auth,
                        server=f", admin: {{port: {admin_port}}}").replace("port: 0,", f"port: {port},", 1)
    config.write_text(text)
    proc = start_kvgate("gateway", ["serve", "-c", str(config)], tmp_path)
    url = f"http://127.0.0.1:{port}/v1/completions"

    async def post(key: str) -> int:
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json={"model": "m", "prompt": "x"},
                                    headers={"Authorization": f"Bearer {key}"}) as resp:
                return resp.status

    try:
        await asyncio.to_thread(proc.wait_http, f"http://127.0.0.1:{admin_port}/kvgate/status", 30)
        assert await post("sk-old") == 200 and await post("sk-new") == 401
        keys.write_text(f"new:{hash_key('sk-new')}\n")  # key rotation: the auth filter restarts
        proc.signal(signal.SIGHUP)

        async def rotated() -> bool:
            return await post("sk-new") == 200

        await wait_until(rotated, timeout=10, message="the reloaded keys")
        assert await post("sk-old") == 401
        config.write_text("clusters: [")  # broken: logged, the running config stays
        proc.signal(signal.SIGHUP)
        await wait_until(lambda: "reload of" in proc.log_tail(), timeout=10, message="the rejection logged")
        assert await post("sk-new") == 200 and proc.alive()
        code = await asyncio.to_thread(proc.stop, 15)
        assert code == 0, proc.log_tail()
    finally:
        proc.kill()
