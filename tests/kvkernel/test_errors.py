"""One error vocabulary: `type` from the status (OpenAI's names), `code` for the case."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

from kvkernel.errors import error_body, error_type
from testbed.sim_vllm.cache import PrefixCache
from testbed.sim_vllm.engine import Engine, EngineConfig
from testbed.sim_vllm.server import make_app
from testbed.sim_vllm.tokenizer import load_tokenizer


@pytest.mark.parametrize("status,type_", [
    (400, "invalid_request_error"), (413, "invalid_request_error"), (422, "invalid_request_error"),
    (401, "authentication_error"), (403, "permission_error"), (404, "not_found_error"),
    (429, "rate_limit_error"), (500, "server_error"), (502, "server_error"), (503, "server_error"),
    (504, "server_error"),
])
def test_type_follows_the_status(status: int, type_: str) -> None:
    assert error_type(status) == type_
    assert error_body(status, "m", code="c") == {"error": {"message": "m", "type": type_, "param": None, "code": "c"}}


async def test_sim_vllm_speaks_the_same_vocabulary_as_the_gateway() -> None:
    config = EngineConfig()
    engine = Engine(config, load_tokenizer(None), PrefixCache(config.block_size, config.capacity_blocks))
    async with TestClient(TestServer(make_app(engine, model="sim", instance_id="s"))) as client:
        resp = await client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        error = (await resp.json())["error"]
    assert resp.status == 404
    assert (error["type"], error["code"], error["param"]) == ("not_found_error", "model_not_found", "model")
