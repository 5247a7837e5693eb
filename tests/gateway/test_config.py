"""Strict config decoding: every error names its YAML path; check-config exits 0/1."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_config_text
from gateway.serve import load_and_plan
from kvkernel.decode import ConfigError, parse_duration, parse_size

REPO = Path(__file__).resolve().parents[2]
VALID = """
server: {port: 8888, max_body_bytes: 8MiB}
clusters:
  - name: llm
    lb_policy: round_robin
    health_check: {path: /health, interval: 5s, timeout: 1s}
    retry: {max_attempts: 2}
    timeouts: {connect: 250ms, first_byte: 1m}
    endpoints:
      - {id: mlx-a, url: "http://127.0.0.1:8101", kind: mlx}
      - {id: vllm-1, url: "http://127.0.0.1:8102", kind: vllm, lmcache_instance_id: vllm-instance-1}
routes:
  - {match: {prefix: /v1/}, cluster: llm}
filters:
  - type: prompt
  - type: access-log
    config: {path: logs/access.jsonl}
"""


def test_valid_config_decodes_units_and_defaults() -> None:
    config = load_config_text(VALID)
    cluster = config.cluster("llm")
    assert config.server.max_body_bytes == 8 * 1024 * 1024
    assert cluster.timeouts.connect == pytest.approx(0.25) and cluster.timeouts.first_byte == 60.0
    assert cluster.retry.max_attempts == 2 and cluster.circuit_breaker.failure_threshold == 5
    assert cluster.endpoints[1].lmcache_instance_id == "vllm-instance-1"


def test_hardening_defaults() -> None:
    """Defaults of the timeouts, outlier detection and limits (docs/operations.md)."""
    config = load_config_text(VALID)
    cluster, limits = config.cluster("llm"), config.server.limits
    assert (cluster.timeouts.idle, cluster.timeouts.total) == (60.0, 600.0)
    od = cluster.outlier_detection
    assert (od.consecutive_5xx, od.consecutive_gateway_failure, od.base_ejection_time, od.max_ejection_time,
            od.max_ejection_percent) == (5, 5, 30.0, 300.0, 50)
    assert cluster.max_inflight_per_endpoint is None and config.server.reuse_port is False
    assert (limits.max_connections, limits.max_inflight, limits.max_queue, limits.queue_timeout) == \
        (4096, None, 1024, 10.0)
    assert (limits.header_timeout, limits.body_timeout, limits.keepalive_timeout) == (10.0, 60.0, 75.0)


@pytest.mark.parametrize("value,seconds", [("50ms", 0.05), ("2s", 2.0), ("5m", 300.0), ("1h", 3600.0),
                                           ("100us", 1e-4), (3, 3.0), (0.5, 0.5)])
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value,size", [("8MiB", 8 << 20), ("512KB", 512_000), ("1GiB", 1 << 30), (100, 100)])
def test_sizes(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("old,new,path", [
    ("retry: {max_attempts: 2}", "retry: {max_attempts: 0}", "clusters[0].retry.max_attempts"),
    ("connect: 250ms", "connect: soon", "clusters[0].timeouts.connect"),
    ("kind: mlx}", "kind: gpu}", "clusters[0].endpoints[0].kind"),
    ("kind: mlx}", "kind: mlx, colour: red}", "clusters[0].endpoints[0].colour"),
    ("cluster: llm}", "cluster: nope}", "routes[0].cluster"),
    ("lb_policy: round_robin", "lb_policy: fastest", "clusters[0].lb_policy"),
    ("max_body_bytes: 8MiB", "max_body_bytes: lots", "server.max_body_bytes"),
    ("port: 8888", "port: '8888'", "server.port"),
    ('url: "http://127.0.0.1:8101"', 'url: "127.0.0.1:8101"', "clusters[0].endpoints[0].url"),
    ("id: vllm-1", "id: mlx-a", "clusters[0].endpoints[1].id"),
    ("config: {path: logs/access.jsonl}", "config: {path: logs/a.jsonl, rotate: true}",
     "filters[1](access-log).config.rotate"),
    ("- type: prompt", "- type: promptz", "filters[0].type"),
    ("connect: 250ms", "connect: 250ms, idle: 0s", "clusters[0].timeouts.idle"),
    ("connect: 250ms", "connect: 250ms, total: -1s", "clusters[0].timeouts.total"),
    ("retry: {max_attempts: 2}", "retry: {max_attempts: 2}\n    outlier_detection: {consecutive_5xx: 0}",
     "clusters[0].outlier_detection.consecutive_5xx"),
    ("retry: {max_attempts: 2}", "retry: {max_attempts: 2}\n    outlier_detection: {max_ejection_percent: 101}",
     "clusters[0].outlier_detection.max_ejection_percent"),
    ("retry: {max_attempts: 2}", "retry: {max_attempts: 2}\n    outlier_detection: {base_ejection_time: 1m, "
     "max_ejection_time: 30s}", "clusters[0].outlier_detection.max_ejection_time"),
    ("retry: {max_attempts: 2}", "retry: {max_attempts: 2}\n    max_inflight_per_endpoint: 0",
     "clusters[0].max_inflight_per_endpoint"),
    ("max_body_bytes: 8MiB", "max_body_bytes: 8MiB, limits: {max_inflight: 0}", "server.limits.max_inflight"),
    ("max_body_bytes: 8MiB", "max_body_bytes: 8MiB, limits: {header_timeout: 0s}", "server.limits.header_timeout"),
    ("max_body_bytes: 8MiB", "max_body_bytes: 8MiB, limits: {slowloris: 1}", "server.limits.slowloris"),
    ("max_body_bytes: 8MiB", "max_body_bytes: 8MiB, reuse_port: maybe", "server.reuse_port"),
    ("lb_policy: round_robin", "lb_policy: cache_aware\n    cache_aware: {load_weight: -1}",
     "clusters[0].cache_aware.load_weight"),
    ("lb_policy: round_robin", "lb_policy: cache_aware\n    cache_aware: {cache_weight: .nan}",
     "clusters[0].cache_aware.cache_weight"),
    ("lb_policy: round_robin", "lb_policy: cache_aware\n    cache_aware: {max_waiting: -2}",
     "clusters[0].cache_aware.max_waiting"),
])
def test_errors_name_the_yaml_path(old: str, new: str, path: str, tmp_path: Path) -> None:
    assert old in VALID
    file = tmp_path / "bad.yaml"
    file.write_text(VALID.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_and_plan(str(file))
    assert str(err.value).startswith(path + ":"), str(err.value)


def test_duplicate_keys_and_yaml_syntax_are_rejected() -> None:
    with pytest.raises(ConfigError, match="duplicate key 'server'"):
        load_config_text("server: {}\nserver: {}\nclusters: []\nroutes: []")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config_text("clusters: [")


def _check_config(file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "check-config", str(file)], capture_output=True,
                          text=True, cwd=REPO, timeout=60)


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(VALID)
    bad.write_text(VALID.replace("failure_threshold", "x").replace("retry: {max_attempts: 2}", "").replace(
        "connect: 250ms", "connect: -1s"))
    ok = _check_config(good)
    assert ok.returncode == 0 and "OK" in ok.stdout
    failed = _check_config(bad)
    assert failed.returncode == 1
    assert "clusters[0].timeouts.connect" in failed.stderr


def test_shipped_configs_are_valid(tmp_path: Path) -> None:
    """Every file in configs/ passes check-config; `model_dir` paths (made by the demo or inside
    the compose containers) point at a freshly generated tiny model here."""
    model = tmp_path / "tiny"
    made = subprocess.run([sys.executable, "-m", "gateway", "make-tiny-model", str(model), "--seed", "0"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert made.returncode == 0, made.stderr
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert {"gateway.yaml", "cache-aware.yaml", "compose.yaml", "demo.yaml"} <= {f.name for f in files}
    for file in files:
        text = re.sub(r"model_dir: *[^,}\s]+", f"model_dir: {model}", file.read_text())
        copy = tmp_path / file.name
        copy.write_text(text)
        result = _check_config(copy)
        assert result.returncode == 0, f"{file.name}: {result.stderr}"
