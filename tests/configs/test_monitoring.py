"""The Grafana dashboard and Prometheus config against a live stack (a gateway, one
sim-vllm, the mock LMCache as real processes): every metric a panel's PromQL names
is exported by some scrape; the scrape config and compose profile are wired.
Also: `--log-format json` / `server.log_format: json` make every process log JSON lines
with the access log's timestamp format."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from testbed.procs import HOST, ManagedProcess, free_ports, start_kvgate

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan", "le"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "gauge": ("",), "untyped": ("",)}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, labels, keywords or numbers)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings (label values)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        if not m.group(2) and m.group(1).lower() not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def exported_names(text: str) -> set[str]:
    """Sample names in a Prometheus exposition, plus every name a declared family can have."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names |= {name + s for s in SUFFIXES.get(kind.strip(), ("",))}
            if kind.strip() == "counter" and name.endswith("_total"):
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def test_the_expression_parser() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, instance) (rate(vllm:time_to_first_token_seconds_bucket'
            '{job="sim-vllm"}[5m]))) / on (instance) max(kvgate_endpoint_healthy) > bool 0.5')
    assert metric_names(expr) == {"vllm:time_to_first_token_seconds_bucket", "kvgate_endpoint_healthy"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[dict[str, object]]:
    work = tmp_path_factory.mktemp("monitoring")
    gw, sim, ctl = free_ports(3)
    procs: list[ManagedProcess] = []
    config = work / "gateway.yaml"
    config.write_text(f"""
server: {{host: {HOST}, port: {gw}, log_format: json}}
clusters:
  - name: llm
    lb_policy: cache_aware
    health_check: {{path: /health, interval: 200ms, timeout: 1s}}
    endpoints:
      - {{id: sim-1, url: "http://{HOST}:{sim}", kind: vllm}}
routes:
  - {{match: {{prefix: /v1/}}, cluster: llm}}
filters:
  - type: prompt
  - type: tokenizer
    config: {{backend: local, model_dir: "{tiny_model_dir}"}}
  - type: kvcache
    config: {{lmcache_endpoint: "http://{HOST}:{ctl}", lookup_timeout: 250ms}}
  - type: access-log
    config: {{path: "{work / 'access.jsonl'}"}}
""")
    try:
        for name, args, ready in (
                ("lmcache", ["mock-lmcache", "--port", str(ctl), "--log-format", "json"], f"{ctl}/controller/workers"),
                ("sim-1", ["sim-vllm", "--id", "sim-1", "--port", str(sim), "--model", str(tiny_model_dir),
                           "--log-format", "json"], f"{sim}/health"),
                ("gateway", ["serve", "-c", str(config)], f"{gw}/readyz")):
            procs.append(start_kvgate(name, args, work))
            procs[-1].wait_http(f"http://{HOST}:{ready}", timeout=60)
        for i in range(4):  # traffic, so labelled series exist
            body = json.dumps({"model": "tiny", "prompt": f"hello {i % 2} " * 40, "max_tokens": 4}).encode()
            req = urllib.request.Request(f"http://{HOST}:{gw}/v1/completions", body,
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback
                assert resp.status == 200
        scrapes = {}
        for name, port in (("gateway", gw), ("sim-1", sim), ("lmcache", ctl)):
            with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as resp:  # noqa: S310
                scrapes[name] = resp.read().decode()
        yield {"scrapes": scrapes, "procs": procs, "work": work}
    finally:
        for proc in procs:
            proc.stop()


def _panel_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads((ROOT / "configs" / "grafana" / "kvgate.json").read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def test_every_panel_reads_only_metrics_the_stack_exports(stack: dict) -> None:
    exported = set().union(*(exported_names(text) for text in stack["scrapes"].values()))
    exprs = _panel_exprs()
    assert len(exprs) >= 12
    missing = {title: sorted(metric_names(expr) - exported) for title, expr in exprs if metric_names(expr) - exported}
    assert not missing, f"panels name metrics no scrape exports: {missing}"
    assert all(metric_names(expr) for _, expr in exprs)  # every expression reads at least one metric
    topics = " ".join(title.lower() for title, _ in exprs)
    for topic in ("requests", "ttft", "hit ratio", "tier", "breaker", "queues", "kv cache usage"):
        assert topic in topics


def test_prometheus_scrapes_every_compose_service_and_grafana_is_provisioned() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    prom = yaml.safe_load((ROOT / "configs" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    stack_services = {name for name, spec in compose.items() if not spec.get("profiles")}
    assert {t.split(":")[0] for t in targets} == stack_services
    for name in ("prometheus", "grafana"):
        assert compose[name]["profiles"] == ["monitoring"]
    for volume in [*compose["prometheus"]["volumes"], *compose["grafana"]["volumes"]]:
        assert (ROOT / volume.split(":")[0]).exists(), volume
    datasource = yaml.safe_load((ROOT / "configs/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads((ROOT / "configs" / "grafana" / "kvgate.json").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {uid}


def test_every_process_logs_json_lines_with_the_access_log_timestamp(stack: dict) -> None:
    for proc in stack["procs"]:
        lines = [line for line in proc.log_path.read_text().splitlines() if line.strip()]
        parsed = [json.loads(line) for line in lines if line.startswith("{")]
        assert parsed, f"{proc.name}: no JSON log line in {lines[:5]}"
        assert all(STAMP.match(p["time"]) and p["level"] and "message" in p for p in parsed)
        assert not [line for line in lines if re.match(r"\d{4}-\d\d-\d\d \d\d:", line)], proc.name
    access = (stack["work"] / "access.jsonl").read_text().splitlines()
    assert STAMP.match(json.loads(access[0])["time"])
