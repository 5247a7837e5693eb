"""Routing by path prefix, the body's model and headers: matching, config checks, end to end."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import load_config_text
from gateway.routes import RouteConfig, RouteTable
from gateway.serve import check_config_main
from kvkernel.decode import ConfigError, decode
from testbed.fake_openai import FakeBackend
from tests.conftest import wait_until
from tests.gateway.harness import Stack, start_backend, start_gateway


def _table(*routes: dict[str, Any]) -> RouteTable:
    return RouteTable([decode(RouteConfig, r, f"routes[{i}]") for i, r in enumerate(routes)])


def _cluster_of(table: RouteTable, path: str, model: str | None, headers: dict[str, str] | None = None) -> str | None:
    route = table.match(path, {k.lower(): v for k, v in (headers or {}).items()}, model)
    return route.cluster if route else None


class _Headers(dict[str, str]):
    """Case-insensitive lookups, as aiohttp's request headers."""

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)


def test_model_exact_list_and_glob_then_first_match_wins() -> None:
    table = _table({"match": {"model": "alpha"}, "cluster": "a"},
                   {"match": {"model": ["beta", "gamma-*"]}, "cluster": "b"},
                   {"match": {"prefix": "/v1/"}, "cluster": "rest"})
    assert _cluster_of(table, "/v1/completions", "alpha") == "a"
    assert _cluster_of(table, "/v1/completions", "beta") == "b"
    assert _cluster_of(table, "/v1/completions", "gamma-7b") == "b"
    assert _cluster_of(table, "/v1/completions", "gamma") == "rest"  # the glob needs the dash
    assert _cluster_of(table, "/v1/completions", None) == "rest"  # no model: model routes never match
    assert _cluster_of(table, "/other", "alpha") == "a"  # default prefix is "/"
    assert _cluster_of(table, "/other", "delta") is None


def test_headers_exact_and_regex_combine_with_prefix_and_model() -> None:
    table = _table({"match": {"prefix": "/v1/", "model": "m", "headers": {"X-Tenant": {"regex": "team-[0-9]+"}}},
                    "cluster": "teams"},
                   {"match": {"prefix": "/v1/", "headers": {"x-tier": "gold"}}, "cluster": "gold"},
                   {"match": {"prefix": "/v1/"}, "cluster": "rest"})
    h = _Headers
    assert table.match("/v1/x", h({"x-tenant": "team-12"}), "m").cluster == "teams"  # type: ignore[union-attr]
    assert table.match("/v1/x", h({"x-tenant": "team-12x"}), "m").cluster == "rest"  # type: ignore[union-attr]
    assert table.match("/v1/x", h({"x-tenant": "team-1"}), "other").cluster == "rest"  # type: ignore[union-attr]
    assert table.match("/v1/x", h({"x-tier": "gold"}), None).cluster == "gold"  # type: ignore[union-attr]
    assert table.match("/v1/x", h({"x-tier": "Gold"}), None).cluster == "rest"  # type: ignore[union-attr]


BASE = """
clusters:
  - {name: a, endpoints: [{id: a1, url: "http://127.0.0.1:1"}]}
  - {name: b, endpoints: [{id: b1, url: "http://127.0.0.1:2"}]}
routes:
"""


@pytest.mark.parametrize("routes,error", [
    ("  - {match: {prefix: /v1/}, cluster: a}\n  - {match: {prefix: /v1/}, cluster: b}",
     "routes[1].match: duplicate of routes[0]"),
    ("  - {match: {prefix: /v1/}, cluster: a}\n  - {match: {prefix: /v1/chat/}, cluster: b}",
     "routes[1].match: unreachable: routes[0] comes first"),
    ("  - {match: {model: 'llama-*'}, cluster: a}\n  - {match: {model: [llama-3, llama-3-*]}, cluster: b}",
     "routes[1].match: unreachable"),
    ("  - {match: {model: m}, cluster: a}\n  - {match: {model: m, headers: {x-t: 'y'}}, cluster: b}",
     "routes[1].match: unreachable"),
    ("  - {match: {headers: {x-t: {regex: 'a.*'}}}, cluster: a}\n"
     "  - {match: {headers: {X-T: abc}, model: m}, cluster: b}",
     "routes[1].match: unreachable"),
    ("  - {match: {headers: {x-t: {regex: '('}}}, cluster: a}", "routes[0].match.headers.x-t.regex: invalid"),
    ("  - {match: {prefix: /v1/}, cluster: a, rewrite_model: x}", "routes[0].rewrite_model: needs `match.model`"),
    ("  - {match: {model: []}, cluster: a}", "routes[0].match.model: must not be an empty list"),
    ("  - {match: {model: m, tenant: x}, cluster: a}", "routes[0].match.tenant: unknown key"),
])
def test_config_rejects_duplicate_unreachable_and_bad_routes(routes: str, error: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(BASE + routes)
    assert error in str(info.value)


@pytest.mark.parametrize("routes", [
    "  - {match: {prefix: /v1/chat/}, cluster: b}\n  - {match: {prefix: /v1/}, cluster: a}",  # narrower first
    "  - {match: {model: m}, cluster: a}\n  - {match: {prefix: /v1/}, cluster: b}",
    "  - {match: {model: 'gpt-4*'}, cluster: a}\n  - {match: {model: 'gpt-*'}, cluster: b}",
    "  - {match: {model: 'a?c'}, cluster: a}\n  - {match: {model: 'a*c'}, cluster: b}",  # not provably covered
    "  - {match: {headers: {x-t: 'y'}}, cluster: a}\n  - {match: {prefix: /}, cluster: b}",
])
def test_config_accepts_reachable_routes(routes: str) -> None:
    assert len(load_config_text(BASE + routes).routes) == 2


def test_check_config_names_the_route(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(BASE + "  - {match: {prefix: /v1/}, cluster: a}\n  - {match: {prefix: /v1/chat/}, cluster: b}\n")
    assert check_config_main([str(path)]) == 1
    assert "routes[1].match: unreachable" in capsys.readouterr().err


# --- end to end: two models on two pools --------------------------------------------------


def _yaml(ports: dict[str, int], log_path: Path) -> str:
    def cluster(name: str, eid: str) -> str:
        return (f"  - name: {name}\n    health_check: {{interval: 50ms, timeout: 500ms}}\n"
                f"    endpoints: [{{id: {eid}, url: 'http://127.0.0.1:{ports[eid]}'}}]\n")
    return f"""
server: {{port: 0, debug_headers: true}}
clusters:
{cluster("alpha", "a1")}{cluster("beta", "b1")}{cluster("gold", "g1")}
routes:
  - {{match: {{prefix: /v1/, headers: {{x-tier: gold}}}}, cluster: gold, name: gold}}
  - {{match: {{prefix: /v1/, model: alpha}}, cluster: alpha, name: alpha}}
  - {{match: {{prefix: /v1/, model: [beta, "beta-*"]}}, cluster: beta, name: beta, rewrite_model: upstream-beta}}
filters:
  - type: prompt
  - type: access-log
    config: {{path: "{log_path}"}}
"""


@pytest.fixture
async def pools(tmp_path: Path) -> AsyncIterator[Stack]:
    fakes = {"a1": FakeBackend("a1", model="alpha"), "b1": FakeBackend("b1", model="upstream-beta"),
             "g1": FakeBackend("g1", model="gold-model")}
    servers = {eid: await start_backend(f) for eid, f in fakes.items()}
    log_path = tmp_path / "access.jsonl"
    gw = await start_gateway(_yaml({e: s.port for e, s in servers.items()}, log_path))
    yield Stack(gw, fakes, servers, log_path)
    await gw.close()
    for server in servers.values():
        await server.close()


async def _post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None
                ) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
            return resp.status, dict(resp.headers), await resp.read()


async def test_two_models_on_two_pools_with_rewrite_and_header_route(pools: Stack) -> None:
    status, headers, _ = await _post(pools.url, {"model": "alpha", "prompt": "hi"})
    assert status == 200 and headers["x-kvgate-endpoint"] == "a1"
    raw = '{"model": "beta-7b", "prompt": "hi",  "max_tokens": 3}'  # odd spacing: only a rewrite re-serialises
    async with aiohttp.ClientSession() as session:
        async with session.post(pools.url + "/v1/completions", data=raw,
                                headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 200 and resp.headers["x-kvgate-endpoint"] == "b1"
    assert pools.backends["b1"].requests[-1] == {"model": "upstream-beta", "prompt": "hi", "max_tokens": 3}
    status, headers, _ = await _post(pools.url, {"model": "alpha", "prompt": "hi"}, {"X-Tier": "gold"})
    assert status == 200 and headers["x-kvgate-endpoint"] == "g1"  # first match wins: the header route
    assert [len(f.requests) for f in pools.backends.values()] == [1, 1, 1]
    await wait_until(lambda: len(pools.access_log()) == 3)
    lines = pools.access_log()
    assert [(x["route"], x["cluster"], x["model"]) for x in lines] == [
        ("alpha", "alpha", "alpha"), ("beta", "beta", "beta-7b"), ("gold", "gold", "alpha")]
    assert lines[1]["upstream_model"] == "upstream-beta" and "upstream_model" not in lines[0]


async def test_body_is_forwarded_untouched_without_rewrite(pools: Stack) -> None:
    raw = b'{"model":  "alpha", "prompt": "hi"}'
    async with aiohttp.ClientSession() as session:
        async with session.post(pools.url + "/v1/completions", data=raw,
                                headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 200
    assert pools.backends["a1"].requests == [json.loads(raw)]


async def test_unknown_model_is_an_openai_404_naming_it(pools: Stack) -> None:
    status, _, body = await _post(pools.url, {"model": "gpt-9", "prompt": "hi"})
    error = json.loads(body)["error"]
    assert status == 404
    assert error["code"] == "model_not_found" and error["type"] == "not_found_error"
    assert "'gpt-9'" in error["message"] and error["param"] == "model"
    assert not any(f.requests for f in pools.backends.values())
    status, _, body = await _post(pools.url, {"prompt": "hi"})  # no model: only the header route could take it
    assert status == 404 and json.loads(body)["error"]["code"] == "route_not_found"
    assert "without a 'model'" in json.loads(body)["error"]["message"]
    await wait_until(lambda: len(pools.access_log()) == 2)
    assert pools.access_log()[0]["status"] == 404 and pools.access_log()[0]["model"] == "gpt-9"


async def test_models_lists_what_each_route_serves(pools: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(pools.url + "/v1/models") as resp:
            assert resp.status == 200
            ids = [m["id"] for m in (await resp.json())["data"]]
        # Route names first; the backend of the rewriting route is reached only by its names.
        assert ids == ["alpha", "beta"]
        async with session.get(pools.url + "/v1/models", headers={"x-tier": "gold"}) as resp:
            ids = [m["id"] for m in (await resp.json())["data"]]
        assert ids == ["gold-model", "alpha", "beta"]
    await wait_until(lambda: len(pools.access_log()) == 2)
    assert pools.access_log()[0]["route"] == "alpha"  # through the chain, logged like any request
