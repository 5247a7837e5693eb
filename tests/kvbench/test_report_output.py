"""Where benchmark results go: the working directory by default, or where the user asks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvbench import report

ROOT = Path(__file__).resolve().parents[2]


def _kvgate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(report.OUTPUT_ENV, None)
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_bench_help_lists_the_benchmarks_and_the_output_flag(tmp_path: Path) -> None:
    done = _kvgate("bench", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in ("overhead", "mlx", "routing", "cache-round", "--output"):
        assert name in done.stdout


def test_default_is_the_working_directory_not_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(report.OUTPUT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    written = report.write_section("x", "body")
    assert written.resolve() == tmp_path / "benchmarks.md" and "body" in written.read_text()
    monkeypatch.setenv(report.OUTPUT_ENV, str(tmp_path / "elsewhere" / "b.md"))
    assert report.write_section("x", "again") == tmp_path / "elsewhere" / "b.md"


def test_bench_output_flag_reaches_a_benchmark_without_its_own(tmp_path: Path) -> None:
    out = tmp_path / "results" / "cache.md"
    done = _kvgate("bench", "-o", str(out), "cache-round", "--prefixes", "64", "--rounds", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "<!-- bench:cache-round:start -->" in out.read_text()
    assert not (tmp_path / "benchmarks.md").exists()
