"""Input hygiene against a live gateway on 127.0.0.1: refused request targets are 400s
in OpenAI's shape, a trailing slash is normalised for routes, filters and the
upstream, malformed requests log one line, draining answers close the connection,
and a second gateway refuses a port already served."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
from pathlib import Path

import pytest

from gateway import serve
from gateway.hygiene import TargetError, normalise_target
from gateway.listen import port_in_use
from tests.conftest import wait_until
from tests.gateway.harness import fake_stack

BODY = b'{"model":"fake-model","prompt":"hi"}'


@pytest.mark.parametrize(("raw", "expected"), [
    ("/v1/completions", "/v1/completions"), ("/v1/completions/", "/v1/completions"), ("/", "/"),
    ("/v1/completions?x=1&y=/../", "/v1/completions?x=1&y=/../"), ("/v1/models/", "/v1/models"),
    ("/v1/%41", "/v1/%41"),
])
def test_accepted_targets_are_normalised(raw: str, expected: str) -> None:
    assert normalise_target(raw) == expected


@pytest.mark.parametrize("raw", [
    "http://host/v1/completions", "*", "host:80", "/v1/../v1/completions", "/v1/./completions", "//v1/completions",
    "/v1//completions", "/v1/completions//", "/v1/%2e%2e/x", "/v1/%2E./x", "/v1%2fcompletions", "/v1%2Fx",
    "/v1/completions;x=1", "/v1\\completions", "/v1/%00", "/v1/%5c", "/v1/..", "/..",
])
def test_refused_targets(raw: str) -> None:
    with pytest.raises(TargetError):
        normalise_target(raw)


async def raw_request(port: int, target: str, method: str = "POST", body: bytes = BODY,
                      extra: str = "") -> tuple[str, dict[str, str], bytes, bool]:
    """Status line, headers, body, and whether the server closed the connection after it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n{extra}\r\n".encode() + body)
    await writer.drain()
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode()
    status, *lines = head.strip().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    data = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
    closed = await asyncio.wait_for(reader.read(1), 5) == b""
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return status, headers, data, closed


@pytest.mark.parametrize("target", ["http://127.0.0.1/v1/completions", "/v1/../v1/completions",
                                    "/v1/%2e%2e/v1/completions", "/v1%2fcompletions", "/v1/completions;x=1"])
async def test_bad_targets_are_openai_400s_and_logged(tmp_path: Path, target: str) -> None:
    async with fake_stack(tmp_path) as st:
        status, _, body, _ = await raw_request(st.gateway.port, target)
        assert status.split()[1] == "400"
        assert json.loads(body)["error"]["code"] == "invalid_request_target"
        assert not any(f.requests for f in st.backends.values())  # nothing forwarded
        await wait_until(lambda: len(st.access_log()) == 1)
        assert st.access_log()[0]["status"] == 400


async def test_a_trailing_slash_reaches_routes_filters_and_the_upstream_normalised(tmp_path: Path) -> None:
    async with fake_stack(tmp_path) as st:
        status, _, body, _ = await raw_request(st.gateway.port, "/v1/completions/", extra="Connection: close\r\n")
        assert status.split()[1] == "200" and json.loads(body)["object"] == "text_completion"
        await wait_until(lambda: len(st.access_log()) == 1)
        record = st.access_log()[0]
        assert record["path"] == "/v1/completions" and record["model"] == "fake-model"  # the prompt filter ran


async def test_a_malformed_request_logs_one_line_without_traceback(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    async with fake_stack(tmp_path) as st:
        caplog.set_level(logging.DEBUG, logger="aiohttp.server")
        reader, writer = await asyncio.open_connection("127.0.0.1", st.gateway.port)
        writer.write(b"POST * HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.")
        writer.close()
        await writer.wait_closed()
        records = [r for r in caplog.records if r.name == "aiohttp.server"]
        assert records and all(r.exc_info is None and "\n" not in r.getMessage() for r in records)


async def test_draining_answers_close_the_connection(tmp_path: Path) -> None:
    async with fake_stack(tmp_path) as st:
        st.state.draining = True
        status, headers, body, closed = await raw_request(st.gateway.port, "/v1/completions")
        assert status.split()[1] == "503" and headers["connection"] == "close" and closed
        assert json.loads(body)["error"]["code"] == "draining"


def test_a_second_gateway_refuses_a_served_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        config = tmp_path / "gw.yaml"
        config.write_text("clusters: [{name: c, endpoints: [{id: a, url: 'http://127.0.0.1:9'}]}]\n"
                          "routes: [{match: {prefix: /v1/}, cluster: c}]\nserver: {host: 127.0.0.1}\n")
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
        assert serve.main(["-c", str(config), "--port", str(port)]) == 1
        # The signals held during start-up are given back: this process's children inherit its mask
        # (a SIGTERM blocked here once made every daemon the later tests started unstoppable).
        assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == mask
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "already served" in err and "reuse_port" in err
    assert not port_in_use("127.0.0.1", port)


def test_a_bad_config_leaves_the_callers_signal_mask_alone(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("clusters: [{name: c}]\n")
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    assert serve.main(["-c", str(config)]) == 1
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == mask
