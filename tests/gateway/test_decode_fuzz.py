"""Config decoding and prompt extraction under hostile input.

Contract: a bad config raises ConfigError (never anything else) whose path names
the YAML node at fault; `kvgate check-config` prints that and exits 1. The prompt
filter's `extract_prompt` returns a Prompt or raises PromptError, nothing else.
Each test that names a bug was written failing, then the bug was fixed.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filters.prompt import PromptError, extract_prompt
from gateway.config import load_config_text, parse_config
from gateway.plan import plan_gateway
from gateway.serve import check_config_main
from kvkernel.decode import ConfigError, parse_duration, parse_size

REPO = Path(__file__).resolve().parents[2]
VALID: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "port": 8888, "workers": 1, "max_body_bytes": "8MiB", "debug_headers": False},
    "clusters": [{
        "name": "llm", "lb_policy": "least_inflight",
        "health_check": {"path": "/health", "interval": "5s", "timeout": "1s"},
        "circuit_breaker": {"failure_threshold": 5, "recovery_timeout": "10s", "half_open_max_calls": 2},
        "retry": {"max_attempts": 2}, "timeouts": {"connect": "1s", "first_byte": "60s"},
        "endpoints": [{"id": "mlx-a", "url": "http://127.0.0.1:8101", "kind": "mlx"},
                      {"id": "vllm-1", "url": "http://127.0.0.1:8102", "kind": "vllm",
                       "lmcache_instance_id": "vllm-instance-1"}],
    }],
    "routes": [{"match": {"prefix": "/v1/"}, "cluster": "llm"}],
    "filters": [{"type": "prompt"}, {"type": "access-log", "config": {"path": "logs/access.jsonl"}}],
}


def load(data: Any) -> None:
    """Decode like `kvgate check-config`: the YAML text, then the filter configs."""
    plan_gateway(load_config_text(yaml.safe_dump(data)))


def with_value(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(VALID)
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def error_of(data: Any) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        load(data)
    return err.value


# --- every level, wrong types, optional fields, nested lists ----------------------------------------

@pytest.mark.parametrize("path,value,named", [
    (("server",), [], "server"),
    (("server", "port"), "8888", "server.port"),
    (("server", "port"), 8888.0, "server.port"),
    (("server", "debug_headers"), "yes", "server.debug_headers"),
    (("server", "workers"), True, "server.workers"),
    (("clusters",), {"name": "llm"}, "clusters"),
    (("clusters", 0), [VALID["clusters"][0]], "clusters[0]"),
    (("clusters", 0, "endpoints"), [[{"id": "x", "url": "http://h:1"}]], "clusters[0].endpoints[0]"),
    (("clusters", 0, "endpoints"), [], "clusters[0].endpoints"),
    (("clusters", 0, "endpoints"), None, "clusters[0].endpoints"),
    (("clusters", 0, "endpoints", 1, "lmcache_instance_id"), 7, "clusters[0].endpoints[1].lmcache_instance_id"),
    (("clusters", 0, "endpoints", 1, "lmcache_instance_id"), ["a"], "clusters[0].endpoints[1].lmcache_instance_id"),
    (("clusters", 0, "endpoints", 0, "id"), "", "clusters[0].endpoints[0].id"),
    (("clusters", 0, "endpoints", 0, "url"), "http://127.0.0.1:8101/v1", "clusters[0].endpoints[0].url"),
    (("clusters", 0, "health_check"), "5s", "clusters[0].health_check"),
    (("clusters", 0, "health_check", "interval"), True, "clusters[0].health_check.interval"),
    (("clusters", 0, "health_check", "interval"), "0s", "clusters[0].health_check.interval"),
    (("clusters", 0, "health_check", "path"), "health", "clusters[0].health_check.path"),
    (("clusters", 0, "circuit_breaker", "failure_threshold"), 0, "clusters[0].circuit_breaker.failure_threshold"),
    (("clusters", 0, "timeouts", "first_byte"), [1], "clusters[0].timeouts.first_byte"),
    (("clusters", 0, "timeouts", "connect"), "-1s", "clusters[0].timeouts.connect"),
    (("clusters", 0, "cache_aware"), {"max_kv_usage": 2}, "clusters[0].cache_aware"),  # not its picker
    (("clusters", 0, "lb_policy"), "fastest", "clusters[0].lb_policy"),
    (("clusters", 0, "picker"), {"type": "round_robin"}, "clusters[0].picker"),  # beside lb_policy
    (("routes", 0, "match"), "/v1/", "routes[0].match"),
    (("routes", 0, "match", "prefix"), "v1", "routes[0].match.prefix"),
    (("routes", 0, "match"), {"model": []}, "routes[0].match.model"),  # {} is a catch-all
    (("filters",), {"type": "prompt"}, "filters"),
    (("filters", 0), "prompt", "filters[0]"),
    (("filters", 0, "name"), 5, "filters[0].name"),
    (("filters", 0, "config"), {"x": 1}, "filters[0](prompt).config"),
    (("filters", 1, "config"), [1], "filters[1](access-log).config"),
    (("filters", 1, "config", "path"), None, "filters[1](access-log).config.path"),
    (("filters", 1, "config", "include_filter_timings"), "no", "filters[1](access-log).config.include_filter_timings"),
])
def test_errors_name_the_yaml_path_at_every_level(path: tuple[Any, ...], value: Any, named: str) -> None:
    err = error_of(with_value(path, value))
    assert err.path == named, str(err)
    assert str(err).startswith(named + ":")


def test_optional_fields_accept_null_and_defaults() -> None:
    doc = with_value(("clusters", 0, "endpoints", 1, "lmcache_instance_id"), None)
    doc["filters"][0]["name"] = None
    doc["server"] = None  # an empty section means "all defaults"
    config = load_config_text(yaml.safe_dump(doc))
    assert config.clusters[0].endpoints[1].lmcache_instance_id is None and config.server.port == 8888


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just a string\n", "42\n", "~\n"])
def test_a_file_that_is_not_a_mapping_is_a_clear_error(text: str) -> None:
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config_text(text)


def test_yaml_tags_and_multiple_documents_are_rejected_cleanly() -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config_text("!!python/object:os.system {}")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config_text("server: {}\n---\nserver: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config_text(yaml.safe_dump(VALID).replace("port: 8888", "port: !!binary aGVsbG8="))
    assert err.value.path == "server.port"


# --- known bugs: each raises something other than a ConfigError, or passes a bad value ----------------

def test_unknown_keys_of_mixed_types_are_a_config_error() -> None:
    err = error_of(with_value(("server",), {1: 2, "colour": "red"}))
    assert err.path.startswith("server.")


def test_unhashable_yaml_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        load_config_text("server:\n  ? [a, b]\n  : 1\nclusters: []\nroutes: []\n")


@pytest.mark.parametrize("path,value", [
    (("clusters", 0, "timeouts", "first_byte"), 10**400),
    (("server", "max_body_bytes"), "9" * 400 + "GiB"),
], ids=["huge-int-duration", "huge-size-string"])
def test_overflowing_numbers_are_a_config_error(path: tuple[Any, ...], value: Any) -> None:
    assert error_of(with_value(path, value)).path == ".".join(
        f"{p}" if isinstance(p, str) else f"[{p}]" for p in path).replace(".[", "[")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "9" * 400 + "s"])
def test_non_finite_durations_are_rejected(value: Any) -> None:
    err = error_of(with_value(("clusters", 0, "health_check", "interval"), value))
    assert err.path == "clusters[0].health_check.interval"


@pytest.mark.parametrize("url", ["http://127.0.0.1:notaport", "http://127.0.0.1:99999"])
def test_endpoint_url_with_bad_port_is_rejected(url: str) -> None:
    err = error_of(with_value(("clusters", 0, "endpoints", 0, "url"), url))
    assert err.path == "clusters[0].endpoints[0].url"


@pytest.mark.parametrize("path,value,named", [
    (("clusters", 0, "health_check", "timeout"), "0s", "clusters[0].health_check.timeout"),
    (("clusters", 0, "timeouts", "connect"), 0, "clusters[0].timeouts.connect"),
    (("clusters", 0, "timeouts", "first_byte"), "0ms", "clusters[0].timeouts.first_byte"),
    (("clusters", 0, "metrics_interval"), 0, "clusters[0].metrics_interval"),
])
def test_zero_timeouts_and_intervals_are_rejected(path: tuple[Any, ...], value: Any, named: str) -> None:
    assert error_of(with_value(path, value)).path == named


def test_duplicate_nested_key_names_its_line() -> None:
    text = yaml.safe_dump(VALID).replace("kind: mlx\n", "kind: mlx\n    kind: vllm\n", 1)
    with pytest.raises(ConfigError, match=r"duplicate key 'kind' at line \d+"):
        load_config_text(text)


# --- check-config ------------------------------------------------------------------------------------

def test_check_config_cli_on_a_missing_file_exits_1_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(missing)], capture_output=True,
                            text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert str(missing) in result.stderr and "No such file" in result.stderr


@pytest.mark.parametrize("content", [b"", b"- just\n- a list\n", b"clusters: [\n"])
def test_check_config_rejects_non_configs_cleanly(tmp_path: Path, content: bytes,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "c.yaml"
    file.write_bytes(content)
    assert check_config_main([str(file)]) == 1
    assert capsys.readouterr().err.startswith(f"{file}: ")


def test_check_config_on_a_directory_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_config_main([str(tmp_path)]) == 1
    assert "cannot read config file" in capsys.readouterr().err


def test_check_config_on_a_non_utf8_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "latin1.yaml"
    file.write_bytes(yaml.safe_dump(VALID).encode() + b"# caf\xe9\n")
    assert check_config_main([str(file)]) == 1
    assert "UTF-8" in capsys.readouterr().err


# --- property: any single mutation of a valid document fails cleanly, naming a real node -------------

_KEY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
                    st.sampled_from(["5s", "50ms", "8MiB", "-1s", "http://127.0.0.1:1", "/v1/", "llm", "mlx"]))
# Mixed-type keys, huge ints and NaN/inf have their own tests above.
_VALUE = st.recursive(_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(_KEY, inner, max_size=3)), max_leaves=8)


def _locations(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _locations(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _locations(value, prefix + (i,))
    return found


_SEGMENT = re.compile(r"([^.\[\]()]+)|\[(\d+)\]|\(([^)]*)\)")


def _resolves(doc: Any, path: str) -> bool:
    """Every segment but the last names an existing node (the last may be a missing key)."""
    segments = [m.group(1) if m.group(1) is not None else int(m.group(2))
                for m in _SEGMENT.finditer(path) if m.group(3) is None]
    node = doc
    for seg in segments[:-1]:
        try:
            node = node[seg]
        except (KeyError, IndexError, TypeError):
            return False
    return bool(segments)


@settings(max_examples=300, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_mutation_fails_only_with_a_config_error_naming_a_real_node(data: st.DataObject) -> None:
    doc = copy.deepcopy(VALID)
    where = data.draw(st.sampled_from(_locations(doc)))
    parent: Any = doc
    for key in where[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "delete", "add_key"]))
    if action == "replace":
        parent[where[-1]] = data.draw(_VALUE)
    elif action == "delete":
        del parent[where[-1]]
    elif isinstance(parent[where[-1]], dict):
        parent[where[-1]][data.draw(_KEY)] = data.draw(_VALUE)
    try:
        config = parse_config(doc)
        plan_gateway(config)
    except ConfigError as err:
        assert err.path and _resolves(doc, err.path), (err.path, str(err))


@settings(database=None, derandomize=True)
@given(st.one_of(st.text(max_size=12), st.integers(-10**9, 10**9), st.floats(allow_nan=False, allow_infinity=False),
                 st.booleans(), st.none(), st.lists(st.integers(), max_size=2)))
def test_units_parse_to_finite_non_negative_numbers_or_a_config_error(value: Any) -> None:
    for parse in (parse_duration, parse_size):
        try:
            result = parse(value, "x")
        except ConfigError as err:
            assert err.path == "x"
            continue
        assert result >= 0 and result == result and result != float("inf")


# --- property: extract_prompt returns a Prompt or raises PromptError ----------------------------------

_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
                     lambda inner: st.one_of(st.lists(inner, max_size=4),
                                             st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                     max_leaves=12)
_FIELDS = ["model", "prompt", "messages", "stream", "tools", "chat_template_kwargs", "add_generation_prompt"]
_PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"])},
                              optional={"text": st.one_of(st.text(max_size=8), _JSON)})
_MESSAGE = st.fixed_dictionaries({}, optional={"role": st.one_of(st.sampled_from(["user", "system"]), _JSON),
                                               "content": st.one_of(st.text(max_size=8), st.lists(_PART, max_size=3),
                                                                    _JSON)})
_BODY = st.fixed_dictionaries({}, optional={
    **{f: _JSON for f in _FIELDS},
    "prompt": st.one_of(st.text(), st.lists(st.text(), max_size=3), st.lists(st.integers(), max_size=4),
                        st.lists(st.lists(st.integers(), max_size=3), max_size=3), _JSON),
    "messages": st.one_of(st.lists(_MESSAGE, max_size=3), _JSON),
})


@settings(max_examples=400, deadline=None, database=None, derandomize=True)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/embeddings"]), body=_BODY)
def test_extract_prompt_returns_a_prompt_or_a_prompt_error(path: str, body: dict[str, Any]) -> None:
    try:
        found = extract_prompt(path, body)
    except PromptError as err:
        assert err.param and str(err)
        return
    if path == "/v1/embeddings":
        assert found is None
        return
    assert found is not None
    prompt, stream = found
    assert prompt.kind == ("chat" if "chat" in path else "completion") and isinstance(stream, bool)
    assert len(prompt.digest) == 24 and extract_prompt(path, copy.deepcopy(body))[0].digest == prompt.digest  # type: ignore[index]
    if prompt.kind == "completion":
        assert prompt.prompts and all(isinstance(p, str | list) for p in prompt.prompts)
    else:
        assert prompt.messages == body["messages"]


@settings(database=None, derandomize=True)
@given(st.one_of(st.text(), st.lists(st.text(), min_size=1, max_size=4),
                 st.lists(st.integers(0, 2**31), min_size=1, max_size=8),
                 st.lists(st.lists(st.integers(0, 2**31), min_size=1, max_size=4), min_size=1, max_size=3)))
def test_every_valid_completion_prompt_shape_is_kept(prompt: Any) -> None:
    found = extract_prompt("/v1/completions", {"model": "m", "prompt": prompt})
    assert found is not None
    kept = found[0].prompts
    assert kept == ([prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt)


@pytest.mark.parametrize("value", ["false", 0, []])
def test_add_generation_prompt_must_be_a_boolean(value: Any) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": value}
    with pytest.raises(PromptError) as err:
        extract_prompt("/v1/chat/completions", body)
    assert err.value.param == "add_generation_prompt"
