"""The `auth` filter: hashed keys from a file or the environment, 401/403 in OpenAI's
shape, the key id (never the key) in the log and metrics, credentials not forwarded."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from filters.auth import AuthConfig, find_key, hash_key, hash_key_main, parse_keys
from kvkernel.decode import ConfigError
from testbed.fake_openai import FakeBackend
from tests.gateway.harness import Stack, gateway_yaml, start_backend, start_gateway

ALICE, BOB = "sk-alice-0123456789", "sk-bob-9876543210"


def _keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text(f"# id:sha256[:models]\nalice:{hash_key(ALICE)}\nbob:{hash_key(BOB)}:small-model,fake-model\n")
    return path


def test_keys_file_entries_parse_and_match_in_constant_time() -> None:
    keys = parse_keys(f"alice:{hash_key(ALICE)}; bob:{hash_key(BOB)}:m1,m2", "env")
    assert [k.id for k in keys] == ["alice", "bob"]
    assert keys[0].models is None and keys[1].models == {"m1", "m2"}
    assert find_key(keys, BOB) is keys[1]
    assert find_key(keys, "sk-nobody") is None


@pytest.mark.parametrize("text, fragment", [
    ("alice:sk-plain-key", "64 hex digits"),
    (f"alice:{'a' * 64}\nalice:{'b' * 64}", "used twice"),
    ("bad id:" + "a" * 64, "id"),
    ("", "no keys"),
])
def test_bad_keys_files_are_rejected_naming_the_entry(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_keys(text, "keys")


def test_config_needs_exactly_one_source_and_a_readable_one(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from kvkernel.decode import decode_dataclass

    with pytest.raises(ConfigError, match=r"filters\[0\]\(auth\)\.config\.keys_file: give exactly one"):
        decode_dataclass(AuthConfig, {}, "filters[0](auth).config")
    with pytest.raises(ConfigError, match="KVGATE_TEST_KEYS is not set"):
        decode_dataclass(AuthConfig, {"keys_env": "KVGATE_TEST_KEYS"}, "f")
    monkeypatch.setenv("KVGATE_TEST_KEYS", f"alice:{hash_key(ALICE)}")
    assert decode_dataclass(AuthConfig, {"keys_env": "KVGATE_TEST_KEYS"}, "f").load()[0].id == "alice"
    with pytest.raises(ConfigError, match="cannot read"):
        decode_dataclass(AuthConfig, {"keys_file": str(tmp_path / "missing")}, "f")


def test_hash_key_cli_prints_an_entry_from_stdin(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(ALICE + "\n"))
    assert hash_key_main(["alice", "--models", "m1,m2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"alice:{hash_key(ALICE)}:m1,m2" and ALICE not in line
    assert parse_keys(line, "cli")[0].models == {"m1", "m2"}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    fake = FakeBackend("a")
    server = await start_backend(fake)
    log_path = tmp_path / "access.jsonl"
    filters = f'  - type: auth\n    config: {{keys_file: "{_keys_file(tmp_path)}"}}\n'
    yaml_text = gateway_yaml({"a": server.port}, log_path, extra_filters=filters)
    # `auth` must run before `prompt`: put it first.
    yaml_text = yaml_text.replace("filters:\n  - type: prompt\n" + filters,
                                  "filters:\n" + filters + "  - type: prompt\n")
    gw = await start_gateway(yaml_text)
    yield Stack(gw, {"a": fake}, {"a": server}, log_path)
    await gw.close()
    await server.close()


async def _post(stack: Stack, headers: dict[str, str], model: str = "fake-model") -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(stack.url + "/v1/completions", json={"model": model, "prompt": "hi"},
                                headers=headers) as resp:
            return resp.status, dict(resp.headers), json.loads(await resp.read())


async def test_missing_and_wrong_keys_get_an_openai_shaped_401(stack: Stack) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {ALICE}"}):
        status, head, body = await _post(stack, headers)
        assert status == 401
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "invalid_api_key"
        assert head["WWW-Authenticate"] == "Bearer"
    assert stack.backends["a"].requests == []  # nothing reached the backend


async def test_a_good_key_passes_and_only_its_id_is_logged_and_counted(stack: Stack) -> None:
    status, _, _ = await _post(stack, {"Authorization": f"Bearer {ALICE}"})
    assert status == 200
    status, _, _ = await _post(stack, {"x-api-key": BOB})
    assert status == 200
    await _post(stack, {"Authorization": "Bearer sk-wrong"})
    records = stack.access_log()
    assert [r["api_key_id"] for r in records] == ["alice", "bob", None]
    raw = stack.log_path.read_text()
    assert ALICE not in raw and BOB not in raw
    async with aiohttp.ClientSession() as session:
        async with session.get(stack.url + "/metrics") as resp:
            metrics = await resp.text()
    assert 'kvgate_api_key_requests_total{api_key_id="alice",status="200"} 1.0' in metrics
    assert 'kvgate_api_key_requests_total{api_key_id="-",status="401"} 1.0' in metrics
    assert ALICE not in metrics


async def test_client_credentials_are_stripped_before_the_backend(stack: Stack) -> None:
    await _post(stack, {"Authorization": f"Bearer {ALICE}"})
    await _post(stack, {"x-api-key": BOB})
    seen = stack.backends["a"].seen_headers
    assert len(seen) == 2
    assert all("Authorization" not in h and "X-Api-Key" not in h and "x-api-key" not in h for h in seen)


async def test_a_key_limited_to_models_gets_403_naming_the_model(stack: Stack) -> None:
    status, _, body = await _post(stack, {"x-api-key": BOB}, model="big-model")
    assert status == 403 and "big-model" in body["error"]["message"]
    assert body["error"]["code"] == "model_not_allowed" and body["error"]["param"] == "model"
    assert (await _post(stack, {"x-api-key": BOB}, model="small-model"))[0] == 200
    assert (await _post(stack, {"x-api-key": ALICE}, model="big-model"))[0] == 200  # alice: any model


async def test_backend_auth_sends_the_clusters_own_credential(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVGATE_TEST_BACKEND_KEY", "Bearer backend-secret")
    fake = FakeBackend("a")
    server = await start_backend(fake)
    yaml_text = gateway_yaml({"a": server.port}, tmp_path / "log",
                             cluster="\n    backend_auth: {value_env: KVGATE_TEST_BACKEND_KEY}")
    gw = await start_gateway(yaml_text)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{gw.port}/v1/completions", json={"model": "m", "prompt": "x"},
                                    headers={"Authorization": "Bearer client-key"}) as resp:
                assert resp.status == 200
        assert fake.seen_headers[0]["Authorization"] == "Bearer backend-secret"
    finally:
        await gw.close()
        await server.close()


async def test_forward_client_auth_keeps_the_clients_credentials(tmp_path: Path) -> None:
    fake = FakeBackend("a")
    server = await start_backend(fake)
    gw = await start_gateway(gateway_yaml({"a": server.port}, tmp_path / "log",
                                          cluster="\n    forward_client_auth: true"))
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{gw.port}/v1/completions", json={"model": "m", "prompt": "x"},
                                    headers={"Authorization": "Bearer client-key", "x-api-key": "k2"}) as resp:
                assert resp.status == 200
        assert fake.seen_headers[0]["Authorization"] == "Bearer client-key"
        assert fake.seen_headers[0]["x-api-key"] == "k2"
    finally:
        await gw.close()
        await server.close()
