"""`kvgate bench replicas` at a tiny scale through the aiohttp front (never nginx here):
it completes, answers every request, and writes its table and section; never timings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvbench import replicas
from kvbench.front import nginx_binary, nginx_config
from kvbench.report import OUTPUT_ENV
from kvbench.workloads import build

pytestmark = pytest.mark.slow


def test_tiny_replicas_run_through_the_aiohttp_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "benchmarks.md"
    monkeypatch.setenv(OUTPUT_ENV, str(docs))
    argv = ["--workloads", "burst", "--replicas", "1,2", "--front", "aiohttp", "--requests-scale", "0.05",
            "--out", str(tmp_path), "--no-progress"]
    assert replicas.main(argv) == 0
    data = json.loads((tmp_path / "replicas.json").read_text())
    expected = len(build("burst", 0.05).requests)
    assert [(r["replicas"], r["front"]) for r in data["results"]] == [(1, "aiohttp"), (2, "aiohttp")]
    for r in data["results"]:
        assert r["requests"] == expected and r["errors"] == 0 and sum(r["per_backend"].values()) == expected
        assert r["log_stats"]["records"] == expected  # every request in one replica's access log
    two = data["results"][1]["log_stats"]
    assert two["replica_0"] + two["replica_1"] == expected and min(two["replica_0"], two["replica_1"]) > 0
    out = capsys.readouterr().out
    assert "| 1 replica |" in out and "| 2 replicas |" in out and "front: **aiohttp**" in out
    assert "burst: 2 replicas, hit ratio / 1 replica's" in out
    text = docs.read_text()
    assert "<!-- bench:replicas:start -->" in text and "### Several gateway replicas" in text


def test_nginx_config_round_robins_unbuffered_on_loopback(tmp_path: Path) -> None:
    conf = nginx_config(8123, ["http://127.0.0.1:9001", "http://127.0.0.1:9002"], tmp_path)
    assert "listen 127.0.0.1:8123;" in conf and "server 127.0.0.1:9001;" in conf and "server 127.0.0.1:9002;" in conf
    for line in ("daemon off;", "proxy_buffering off;", "proxy_http_version 1.1;", 'proxy_set_header Connection "";',
                 "keepalive 64;", f"pid {tmp_path / 'nginx.pid'};"):
        assert line in conf
    assert "/var/" not in conf


@pytest.mark.skipif(nginx_binary() is None and not os.environ.get("KVGATE_REQUIRE_NGINX"),
                    reason="nginx is not installed (CI installs nginx-light and sets KVGATE_REQUIRE_NGINX)")
def test_tiny_replicas_run_through_a_real_nginx_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The generated nginx config really serves: streamed requests through nginx reach both replicas."""
    monkeypatch.setenv(OUTPUT_ENV, str(tmp_path / "benchmarks.md"))
    argv = ["--workloads", "burst", "--replicas", "2", "--front", "nginx", "--requests-scale", "0.05",
            "--out", str(tmp_path), "--no-progress"]
    assert replicas.main(argv) == 0
    (result,) = json.loads((tmp_path / "replicas.json").read_text())["results"]
    expected = len(build("burst", 0.05).requests)
    assert result["front"] == "nginx" and result["errors"] == 0 and result["requests"] == expected
    stats = result["log_stats"]
    assert stats["replica_0"] + stats["replica_1"] == expected and min(stats["replica_0"], stats["replica_1"]) > 0
