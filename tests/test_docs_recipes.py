"""docs/extending.md's recipes run for real: each ```python block tagged
`<!-- recipe: NAME -->` is executed as a module of its own; the filter and the picker
it registers route real requests through a live gateway (real aiohttp servers on
127.0.0.1), the backend is served behind one, and the benchmark's pure parts and
report run small."""

from __future__ import annotations

import re
import sys
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp.test_utils import TestServer

from filters.registry import registered
from gateway.pickers.registry import registered_pickers
from kvbench.cli import BENCHMARKS
from kvkernel.decode import ConfigError
from testbed.fake_openai import FakeBackend
from tests.conftest import wait_until
from tests.gateway.harness import Stack, gateway_yaml, start_backend, start_gateway

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
_TAGGED = re.compile(r"<!-- recipe: ([a-z][a-z0-9-]*) -->\s*\n```python\n(.*?)\n```", re.S)
_LOADED: dict[str, types.ModuleType] = {}  # registration is global: each recipe runs once per process


def recipe_blocks(text: str) -> dict[str, str]:
    blocks: dict[str, str] = {}
    for name, code in _TAGGED.findall(text):
        assert name not in blocks, f"recipe {name!r} tagged twice"
        blocks[name] = code
    return blocks


def load(name: str) -> types.ModuleType:
    """Execute recipe `name` as module `kvgate_recipe_<name>` (in sys.modules, so that
    dataclass annotations resolve as in any module)."""
    if name not in _LOADED:
        code = recipe_blocks(DOC.read_text())[name]
        module = types.ModuleType(f"kvgate_recipe_{name.replace('-', '_')}")
        module.__file__ = f"{DOC}#recipe-{name}"
        sys.modules[module.__name__] = module
        exec(compile(code, module.__file__, "exec"), module.__dict__)  # the doc is the code under test
        _LOADED[name] = module
    return _LOADED[name]


def test_every_python_block_is_a_tagged_recipe() -> None:
    text = DOC.read_text()
    assert text.count("```python") == len(recipe_blocks(text))
    assert set(recipe_blocks(text)) == {"filter", "picker", "backend", "benchmark"}


def test_recipe_names_do_not_collide_with_built_ins() -> None:
    # Built-ins by module (other tests may have registered their own types already).
    builtin_filters = {n for n, cls in registered().items() if cls.__module__.startswith("filters.")}
    builtin_pickers = {n for n, cls in registered_pickers().items() if cls.__module__.startswith("gateway.pickers.")}
    assert "example-user-affinity" not in builtin_filters
    assert "example_priority" not in builtin_pickers
    assert "example-chunk-keys" not in BENCHMARKS
    load("filter")
    load("picker")
    assert registered()["example-user-affinity"].__module__ == "kvgate_recipe_filter"
    assert registered_pickers()["example_priority"].__module__ == "kvgate_recipe_picker"


@pytest.fixture
async def two_backends(tmp_path: Path) -> AsyncIterator[tuple[dict[str, FakeBackend], dict[str, TestServer]]]:
    fakes = {eid: FakeBackend(eid) for eid in ("a", "b")}
    servers = {eid: await start_backend(fake) for eid, fake in fakes.items()}
    yield fakes, servers
    for server in servers.values():
        await server.close()


async def _post(client: httpx.AsyncClient, url: str, user: Any = None) -> httpx.Response:
    body: dict[str, Any] = {"model": "fake-model", "prompt": "hello", "max_tokens": 2}
    if user is not None:
        body["user"] = user
    return await client.post(f"{url}/v1/completions", json=body)


async def test_filter_recipe_keeps_a_user_on_one_endpoint(two_backends: Any, tmp_path: Path) -> None:
    load("filter")
    fakes, servers = two_backends
    log_path = tmp_path / "access.jsonl"
    yaml_text = gateway_yaml({e: s.port for e, s in servers.items()}, log_path, lb_policy="consistent_hash",
                             extra_filters="  - type: example-user-affinity\n    config: {body_field: user}\n")
    gateway = await start_gateway(yaml_text, monitor=False)
    stack = Stack(gateway, fakes, servers, log_path)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            users = [f"user-{i}" for i in range(8)]
            served: dict[str, set[str]] = {u: set() for u in users}
            for _ in range(3):
                for user in users:
                    response = await _post(client, stack.url, user)
                    assert response.status_code == 200, response.text
                    assert response.headers["x-affinity-key"] == user
                    served[user].add(response.headers["x-kvgate-endpoint"])
            bad = await _post(client, stack.url, 5)
        assert all(len(endpoints) == 1 for endpoints in served.values()), served
        assert {e for endpoints in served.values() for e in endpoints} == {"a", "b"}  # keys spread over both
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "user"
        await wait_until(lambda: len(stack.access_log()) == 25, message="25 access-log lines")
        lines = stack.access_log()  # written after each reply: find them by content, not position
        served_lines = [line for line in lines if line["status"] == 200]
        assert sorted(line["affinity_key"] for line in served_lines) == sorted(users * 3)
        assert {line["decision"] for line in served_lines} == {"lb:consistent_hash"}
        (refused,) = [line for line in lines if line["status"] == 400]
        assert (refused["decision"], refused["affinity_key"]) == ("local_reply", None)
    finally:
        await gateway.close()


def _priority_yaml(ports: dict[str, int], log_path: Path, picker_config: str) -> str:
    text = gateway_yaml(ports, log_path)
    return text.replace("lb_policy: least_inflight", f"picker: {{type: example_priority, config: {picker_config}}}")


async def test_picker_recipe_routes_by_the_configured_order(two_backends: Any, tmp_path: Path) -> None:
    load("picker")
    fakes, servers = two_backends
    ports = {e: s.port for e, s in servers.items()}
    log_path = tmp_path / "access.jsonl"
    gateway = await start_gateway(_priority_yaml(ports, log_path, "{order: [b, a]}"), monitor=False)
    stack = Stack(gateway, fakes, servers, log_path)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            served = [(await _post(client, stack.url)).headers["x-kvgate-endpoint"] for _ in range(4)]
            assert served == ["b"] * 4
            fakes["b"].status = 503  # b answers 503: the exchange fails over to the next in order
            failed_over = await _post(client, stack.url)
        assert failed_over.status_code == 200 and failed_over.headers["x-kvgate-endpoint"] == "a"
        await wait_until(lambda: len(stack.access_log()) == 5, message="five access-log lines")
        decisions = sorted((line["decision"], line["decision_reason"]) for line in stack.access_log())
        assert decisions == [("failover:example_priority", "rank 1")] + [("lb:example_priority", "rank 0")] * 4
    finally:
        await gateway.close()


def test_picker_recipe_config_is_strict(tmp_path: Path) -> None:
    from gateway.config import load_config_text
    from gateway.plan import plan_gateway

    load("picker")
    ports = {"a": 1, "b": 2}
    with pytest.raises(ConfigError, match=r"clusters\[0\]\.picker\.config\.order: lists an endpoint twice"):
        plan_gateway(load_config_text(_priority_yaml(ports, tmp_path / "log", "{order: [a, a]}")))
    with pytest.raises(ConfigError, match=r"clusters\[0\]\.picker\.config"):
        plan_gateway(load_config_text(_priority_yaml(ports, tmp_path / "log", "{weights: {a: 1}}")))


async def test_backend_recipe_is_served_health_checked_and_scraped(tmp_path: Path) -> None:
    recipe = load("backend")
    backend = TestServer(recipe.make_backend(queue_depth=3), host="127.0.0.1")
    await backend.start_server()
    yaml_text = f"""
server: {{port: 0, debug_headers: true}}
clusters:
  - name: echo
    health_check: {{path: /ping, interval: 50ms, timeout: 500ms, unhealthy_threshold: 1}}
    metrics_interval: 50ms
    endpoints:
      - {{id: echo-1, url: "http://127.0.0.1:{backend.port}", kind: openai}}
routes:
  - {{match: {{prefix: /v1/}}, cluster: echo}}
filters:
  - type: prompt
  - type: access-log
    config: {{path: "{tmp_path / 'access.jsonl'}"}}
"""
    gateway = await start_gateway(yaml_text)
    url = f"http://127.0.0.1:{gateway.port}"
    try:
        async with httpx.AsyncClient(timeout=10) as client:

            async def scraped() -> bool:
                status = (await client.get(url + "/kvgate/status")).json()
                return status["endpoints"][0]["num_requests_waiting"] == 3

            await wait_until(scraped, message="the backend's queue depth scraped from its /metrics")
            status = (await client.get(url + "/kvgate/status")).json()["endpoints"][0]
            assert (status["kind"], status["healthy"], status["kv_cache_usage"]) == ("openai", True, 0.25)
            response = await client.post(url + "/v1/completions", json={"model": "echo", "prompt": "hi"})
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == "hello"
            assert response.headers["x-kvgate-endpoint"] == "echo-1"
    finally:
        await gateway.close()
        await backend.close()


def test_benchmark_recipe_measures_renders_and_writes_its_section(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    recipe = load("benchmark")
    results = recipe.measure([512, 1024], repeats=2)
    assert set(results) == {512, 1024} and all(us > 0 for us in results.values())
    table = recipe.render(results)
    assert "| 512 | 2 |" in table and "| 1024 | 4 |" in table
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n<!-- bench:other:start -->\nkept\n<!-- bench:other:end -->\n")
    # Registered as `kvbench/cli.py`'s one line would register it; dispatched by `kvgate bench`.
    monkeypatch.setitem(BENCHMARKS, recipe.NAME, recipe.__name__)
    from kvbench.cli import main as bench_main

    assert bench_main([recipe.NAME, "--lengths", "256,768", "--repeats", "1", "--out", str(out)]) == 0
    written = out.read_text()
    section = written.split(f"<!-- bench:{recipe.NAME}:start -->")[1].split(f"<!-- bench:{recipe.NAME}:end -->")[0]
    assert "### Chunk keys" in section and "| 768 | 3 |" in section
    assert "<!-- bench:other:start -->\nkept\n" in written
    assert "written to" in capsys.readouterr().out
    assert bench_main([recipe.NAME, "--lengths", "256", "--no-write", "--out", str(tmp_path / "none.md")]) == 0
    assert not (tmp_path / "none.md").exists()
