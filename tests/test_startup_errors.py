"""Start-up problems of every verb are one clear line on stderr, never a traceback."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d ")


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def _kvgate(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def _one_clear_line(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "Traceback" not in output and "Unclosed" not in output, output
    errors = [line for line in done.stderr.splitlines() if not _LOG_LINE.match(line)]  # log lines aside
    assert errors and all(n in errors[0] for n in needles), done.stderr


def _gateway_config(tmp_path: Path, port: int, workers: int = 1) -> str:
    path = tmp_path / "gw.yaml"
    path.write_text(f"server: {{port: {port}, workers: {workers}}}\n"
                    "clusters: [{name: llm, endpoints: [{id: a, url: 'http://127.0.0.1:1'}]}]\n"
                    "routes: [{match: {prefix: /v1/}, cluster: llm}]\n")
    return str(path)


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_on_a_busy_port(tmp_path: Path, busy_port: int, workers: int) -> None:
    done = _kvgate(["serve", "-c", _gateway_config(tmp_path, busy_port, workers)], tmp_path)
    _one_clear_line(done, "kvgate serve", str(busy_port), "already served")


@pytest.mark.parametrize("verb", [
    ["sim-vllm", "--id", "s", "--port", "{port}"],
    ["sim-vllm", "--id", "s", "--port", "0", "--kv-events-port", "{port}"],
    ["mock-lmcache", "--port", "{port}"],
])
def test_daemons_on_a_busy_port(tmp_path: Path, busy_port: int, verb: list[str]) -> None:
    done = _kvgate([a.format(port=busy_port) for a in verb], tmp_path)
    _one_clear_line(done, str(busy_port))
    assert "in use" in done.stderr.lower()


@pytest.mark.parametrize("verb,needle", [
    (["mlx-serve", "--model", "missing-dir", "--port", "0"], "missing-dir"),
    (["sim-vllm", "--id", "s", "--port", "0", "--model", "missing-dir"], "missing-dir"),
    (["serve", "-c", "missing.yaml"], "missing.yaml"),
])
def test_missing_model_dir_or_config(tmp_path: Path, verb: list[str], needle: str) -> None:
    _one_clear_line(_kvgate(verb, tmp_path), needle)


def test_mlx_serve_on_a_busy_port(tmp_path: Path, busy_port: int, tiny_model_dir: Path) -> None:
    done = _kvgate(["mlx-serve", "--model", str(tiny_model_dir), "--port", str(busy_port)], tmp_path)
    _one_clear_line(done, "mlx-serve", str(busy_port))
    assert "in use" in done.stderr.lower()
