"""The gateway installs alone: a fresh venv with kvgate and no extras serves a request,
and an optional command names its missing extra instead of printing a traceback."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import aiohttp
import pytest

from testbed.fake_openai import FakeBackend
from testbed.procs import ManagedProcess, free_port
from tests.gateway.harness import gateway_yaml, start_backend

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# The packages the wheel ships, as pyproject declares them (so this list cannot drift).
PACKAGES = tuple(p.rstrip("*") for p in tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"]["find"]["include"])


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_clean_env())
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH, so the venv runs its installed copy, not this tree."""
    return {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel built from a copy of the source, so the build leaves nothing in the tree."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(src)], 300)
    (wheel,) = wheels.glob("kvgate-*.whl")
    return wheel


def _install_without_extras(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"!!! CANNOT CREATE A VENV, the install test did not run: {error!r}")
    wheel = _build_wheel(tmp_path)
    started = time.monotonic()
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)], 600)
    print(f"pip install of kvgate without extras took {time.monotonic() - started:.1f}s")
    return venv / "bin" / "kvgate"


def _check_version_and_missing_extra(kvgate: Path) -> None:
    version = _run([str(kvgate), "--version"], 60)
    assert version.stdout.strip() == "kvgate 0.1.0"
    help_ = subprocess.run([str(kvgate), "mlx-serve", "--help"], capture_output=True, text=True, timeout=60,
                           env=_clean_env())
    assert help_.returncode == 2, help_.stderr
    assert help_.stderr.splitlines() == ["kvgate mlx-serve needs the 'mlx' extra: pip install 'kvgate[mlx]'"]


async def test_a_fresh_venv_without_extras_serves_and_names_missing_extras(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kvgate = await asyncio.to_thread(_install_without_extras, tmp_path)
    await asyncio.to_thread(_check_version_and_missing_extra, kvgate)

    backend = await start_backend(FakeBackend("a"))
    port = free_port()
    config = tmp_path / "gw.yaml"
    text = gateway_yaml({"a": backend.port}, tmp_path / "access.jsonl")
    config.write_text(text.replace("port: 0,", f"port: {port},", 1))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    proc = ManagedProcess("gateway", [str(kvgate), "serve", "-c", str(config)], tmp_path / "gateway.log").start()
    try:
        await asyncio.to_thread(proc.wait_http, f"http://127.0.0.1:{port}/healthz", 30)
        async with aiohttp.ClientSession() as session:
            body = {"model": "m", "prompt": "hi"}
            async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                answer = await resp.json()
        assert answer["choices"][0]["text"] == "hello from a"
        assert await asyncio.to_thread(proc.stop, 15) == 0, proc.log_tail()
    finally:
        proc.kill()
        await backend.close()
