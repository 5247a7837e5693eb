"""Review of cache-aware routing (issue #5): picker and live-gateway bugs found in review."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from filters.keys import CACHE_HINTS, TOKENS, CacheHints, Tokens
from gateway.config import ClusterConfig, EndpointConfig
from gateway.endpoints import build_cluster
from gateway.pickers.cache_aware import CacheAwareConfig
from gateway.pickers.token_scoring import TokenScoring
from kvkernel.context import RequestContext
from kvkernel.decode import FieldError
from kvtok.chat_tokens import ChatTokenizer
from mlxd.tiny_model import write_model
from testbed.fake_openai import FakeBackend
from testbed.procs import free_port, start_kvgate
from tests.conftest import wait_until
from tests.gateway.harness import Stack, gateway_yaml, start_backend, start_gateway


@pytest.mark.parametrize("weights,expected", [
    ({"cache_weight": math.inf}, "a"),       # "pure affinity": inf * 0 saved tokens must not be NaN
    ({"load_weight": math.inf}, "b"),        # "pure load": inf * 0 cost must not be NaN
])
def test_infinite_or_nan_weights_never_crash_the_picker(weights: dict[str, float], expected: str | None) -> None:
    cluster = build_cluster(ClusterConfig("llm", [EndpointConfig("a", "http://127.0.0.1:9001"),
                                                  EndpointConfig("b", "http://127.0.0.1:9002")]))
    a, b = cluster.endpoints
    a.inflight = 1
    ctx = RequestContext("r", "POST", "/v1/completions")
    ctx[TOKENS] = Tokens(list(range(1024)), "request")
    ctx[CACHE_HINTS] = CacheHints(matched_tokens={"a": 768})
    chosen = TokenScoring(CacheAwareConfig(**weights)).pick(cluster.endpoints, ctx).endpoint
    assert chosen in (a, b) and (expected is None or chosen.id == expected)
    assert not any(math.isnan(score) for score in ctx.scores.values())


def test_nan_weights_are_rejected_by_the_config() -> None:
    with pytest.raises(FieldError):
        CacheAwareConfig(cache_weight=math.nan)


# ---- a live gateway (real aiohttp servers on 127.0.0.1) ----

SHARED = list(range(1000, 1512))  # a two-chunk shared prefix (e.g. a system prompt)


def _model_dir(path: Path) -> Path:
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path


async def _complete(client: httpx.AsyncClient, url: str, tail: int) -> httpx.Response:
    return await client.post(f"{url}/v1/completions", json={"model": "fake-model", "prompt": SHARED + [tail] * 300,
                                                             "max_tokens": 4})


async def test_a_client_error_at_the_holder_keeps_the_shared_prefix_affinity(tmp_path: Path) -> None:
    """A 400 (say, max_tokens too large) from the endpoint holding a shared system
    prompt used to wipe that prefix from the local index: later requests lost affinity."""
    fakes = {name: FakeBackend(name) for name in ("a", "b")}
    servers = {name: await start_backend(fake) for name, fake in fakes.items()}
    filters = (f"  - type: tokenizer\n    config: {{backend: local, model_dir: \"{_model_dir(tmp_path)}\"}}\n"
               "  - type: kvcache\n    config: {local_index: {ttl: 1m}}\n")
    log_path = tmp_path / "access.jsonl"
    gateway = await start_gateway(gateway_yaml({n: s.port for n, s in servers.items()}, log_path,
                                               lb_policy="cache_aware", extra_filters=filters))
    stack = Stack(gateway, fakes, servers, log_path)
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            first = await _complete(client, stack.url, 1)
            holder = first.headers["x-kvgate-endpoint"]
            fakes[holder].status = 400
            assert (await _complete(client, stack.url, 2)).status_code == 400
            fakes[holder].status = None
            third = await _complete(client, stack.url, 3)
            assert third.headers["x-kvgate-endpoint"] == holder
        await wait_until(lambda: len(stack.access_log()) == 3, message="three access-log lines")
        line = stack.access_log()[2]
        assert (line["tier"], line["decision"]) == ("prefix-index", "cache_hit")
        assert line["matched_tokens"][holder] >= 512
    finally:
        await gateway.close()
        for server in servers.values():
            await server.close()


# ---- a live gateway in front of a real MLX daemon (seeded tiny model, CPU) ----

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="module")
def mlx_daemon(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    proc = start_kvgate("mlx", ["mlx-serve", "--model", str(tiny_model), "--port", str(port),
                                "--served-model-name", "tiny"], tmp_path_factory.mktemp("logs"))
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
        yield port
    finally:
        proc.stop()


async def test_continue_final_message_is_prefilled_as_the_gateway_predicted(
        tiny_model: Path, mlx_daemon: int, tmp_path: Path) -> None:
    """A prefill continuing a partial assistant message (vLLM's continue_final_message):
    the daemon must not close the turn, and the gateway must count what it prefills."""
    messages = [{"role": "user", "content": "Write a haiku about caches."},
                {"role": "assistant", "content": "Warm keys wait in"}]
    body = {"model": "tiny", "messages": messages, "add_generation_prompt": False, "continue_final_message": True,
            "max_tokens": 1, "temperature": 0}
    filters = f"  - type: tokenizer\n    config: {{backend: local, model_dir: \"{tiny_model}\"}}\n"
    log_path = tmp_path / "access.jsonl"
    gateway = await start_gateway(gateway_yaml({"mlx": mlx_daemon}, log_path, extra_filters=filters))
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            daemon = f"http://127.0.0.1:{mlx_daemon}"
            tokenized = (await client.post(daemon + "/tokenize", json={
                k: body[k] for k in ("model", "messages", "add_generation_prompt", "continue_final_message")})).json()
            text = ChatTokenizer.from_dir(tiny_model).decode(tokenized["tokens"])
            assert text.endswith("<|im_start|>assistant\nWarm keys wait in"), text
            response = await client.post(f"http://127.0.0.1:{gateway.port}/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
        stack = Stack(gateway, {}, {}, log_path)
        await wait_until(lambda: len(stack.access_log()) == 1, message="access-log line")
        line = stack.access_log()[0]
        assert line["prompt_tokens_local"] == line["prompt_tokens"] == tokenized["count"]
    finally:
        await gateway.close()
