"""LMCacheClient: every call's wire format (request body and answer parsing), with respx."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import respx

from filters.lmcache_client import (
    LMCacheClient,
    LMCacheRequestError,
    LMCacheResponseError,
    LookupResult,
    parse_layout,
)

BASE = "http://lmcache.test:9000"


async def _no_sleep(_: float) -> None:
    return None


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False) as mock:
        yield mock


@pytest.fixture
async def client(router: respx.MockRouter) -> AsyncIterator[LMCacheClient]:
    async with httpx.AsyncClient() as http:
        yield LMCacheClient(BASE, http, sleep=_no_sleep)


def _sent(route: respx.Route) -> Any:
    return json.loads(route.calls.last.request.content)


async def test_lookup_posts_tokens_and_parses_array_layout(client: LMCacheClient, router: respx.MockRouter) -> None:
    route = router.post("/lookup").respond(200, json={
        "event_id": "Lookup-1",
        "layout_info": {"mlx-a": ["LocalCPUBackend", 512], "vllm-1": ["LocalDiskBackend", 256]}})
    result = await client.lookup(range(600))
    assert _sent(route) == {"tokens": list(range(600))}
    assert result == LookupResult("Lookup-1", {"mlx-a": ("LocalCPUBackend", 512), "vllm-1": ("LocalDiskBackend", 256)})


async def test_lookup_accepts_object_layout_values(client: LMCacheClient, router: respx.MockRouter) -> None:
    router.post("/lookup").respond(200, json={"event_id": "e", "layout_info": {
        "a": {"location": "LocalCPUBackend", "num_tokens": 256}, "b": {"n": 512}, "c": {"matched_tokens": 0}}})
    result = await client.lookup([1, 2, 3])
    assert result.layout == {"a": ("LocalCPUBackend", 256), "b": ("", 512), "c": ("", 0)}


async def test_lookup_empty_and_null_layouts(client: LMCacheClient, router: respx.MockRouter) -> None:
    router.post("/lookup").mock(side_effect=[httpx.Response(200, json={"event_id": "e", "layout_info": {}}),
                                             httpx.Response(200, json={"event_id": "e", "layout_info": None})])
    assert (await client.lookup([1])).layout == {}
    assert (await client.lookup([1])).layout == {}


@pytest.mark.parametrize("body, layout", [
    ({"event_id": "x", "inst-0": ["LocalCPUBackend", 12]}, {"inst-0": ("LocalCPUBackend", 12)}),  # old flat form
    ({"layout_info": {"i": ("LocalCPUBackend", 3.0)}}, {"i": ("LocalCPUBackend", 3)}),
    ({"layout_info": {"i": {"location": "L", "token_count": 7}}}, {"i": ("L", 7)}),
])
def test_parse_layout_variants(body: dict[str, Any], layout: dict[str, tuple[str, int]]) -> None:
    assert parse_layout(body).layout == layout


@pytest.mark.parametrize("body", [
    {"layout_info": {"i": ["LocalCPUBackend"]}},
    {"layout_info": {"i": ["LocalCPUBackend", -1]}},
    {"layout_info": {"i": ["LocalCPUBackend", "12"]}},
    {"layout_info": {"i": ["LocalCPUBackend", True]}},
    {"layout_info": {"i": {"location": "L"}}},
    {"layout_info": {"i": {"location": 3, "n": 1}}},
    {"layout_info": ["i", "L", 3]},
])
def test_parse_layout_rejects_malformed(body: dict[str, Any]) -> None:
    with pytest.raises(LMCacheResponseError):
        parse_layout(body)


async def test_lookup_malformed_answer_is_response_error(client: LMCacheClient, router: respx.MockRouter) -> None:
    router.post("/lookup").mock(side_effect=[httpx.Response(200, json={"layout_info": {"i": "nope"}}),
                                             httpx.Response(200, text="not json"),
                                             httpx.Response(200, json=[1, 2])])
    for _ in range(3):
        with pytest.raises(LMCacheResponseError, match="/lookup"):
            await client.lookup([1])


async def test_pin_compress_decompress_clear_bodies(client: LMCacheClient, router: respx.MockRouter) -> None:
    pin = router.post("/pin").respond(200, json={"event_id": "p", "num_tokens": 512})
    comp = router.post("/compress").respond(200, json={"event_id": "c", "num_tokens": 256})
    decomp = router.post("/decompress").respond(200, json={"event_id": "d", "num_tokens": 128})
    clear = router.post("/clear").respond(200, json={"event_id": "x", "num_tokens": 1024})
    assert await client.pin("mlx-a", "LocalCPUBackend", [1, 2]) == 512
    assert _sent(pin) == {"instance_id": "mlx-a", "location": "LocalCPUBackend", "tokens": [1, 2]}
    assert await client.compress("mlx-a", "zstd", "LocalCPUBackend", (5, 6)) == 256
    assert _sent(comp) == {"instance_id": "mlx-a", "method": "zstd", "location": "LocalCPUBackend", "tokens": [5, 6]}
    assert await client.compress("mlx-a", "cachegen", "LocalCPUBackend") == 256
    assert _sent(comp) == {"instance_id": "mlx-a", "method": "cachegen", "location": "LocalCPUBackend"}
    assert await client.decompress("mlx-a", "zstd", "LocalCPUBackend", [7]) == 128
    assert _sent(decomp) == {"instance_id": "mlx-a", "method": "zstd", "location": "LocalCPUBackend", "tokens": [7]}
    assert await client.clear("mlx-a", "LocalDiskBackend") == 1024
    assert _sent(clear) == {"instance_id": "mlx-a", "location": "LocalDiskBackend"}


async def test_num_tokens_missing_or_bad_is_response_error(client: LMCacheClient, router: respx.MockRouter) -> None:
    router.post("/pin").mock(side_effect=[httpx.Response(200, json={"event_id": "p"}),
                                          httpx.Response(200, json={"num_tokens": "many"})])
    with pytest.raises(LMCacheResponseError, match="num_tokens"):
        await client.pin("a", "LocalCPUBackend", [1])
    with pytest.raises(LMCacheResponseError, match="num_tokens"):
        await client.pin("a", "LocalCPUBackend", [1])


async def test_move_body(client: LMCacheClient, router: respx.MockRouter) -> None:
    route = router.post("/move").respond(200, json={"event_id": "m", "num_tokens": 256})
    assert await client.move(("a", "LocalCPUBackend"), ("b", "LocalDiskBackend"), [1, 2], should_copy=True) == 256
    assert _sent(route) == {"old_position": ["a", "LocalCPUBackend"], "new_position": ["b", "LocalDiskBackend"],
                            "tokens": [1, 2], "should_copy": True}
    await client.move(("a", "L"), ("b", "L"))
    assert _sent(route) == {"old_position": ["a", "L"], "new_position": ["b", "L"], "should_copy": False}


async def test_health_current_and_old_shapes(client: LMCacheClient, router: respx.MockRouter) -> None:
    route = router.post("/health").mock(side_effect=[
        httpx.Response(200, json={"event_id": "h", "error_codes": {"0": 0, "1": 3}}),
        httpx.Response(200, json={"event_id": "h", "error_code": 0}),
        httpx.Response(200, json={"event_id": "h"}),
    ])
    assert await client.health("mlx-a") == {"0": 0, "1": 3}
    assert _sent(route) == {"instance_id": "mlx-a"}
    assert await client.health("mlx-a") == {"all": 0}
    with pytest.raises(LMCacheResponseError):
        await client.health("mlx-a")


async def test_query_instance(client: LMCacheClient, router: respx.MockRouter) -> None:
    route = router.post("/query_instance").mock(side_effect=[
        httpx.Response(200, json={"event_id": "q", "res": "vllm-instance-1"}),
        httpx.Response(200, json={"event_id": "q", "res": ""}),
    ])
    assert await client.query_instance("127.0.0.1") == "vllm-instance-1"
    sent = _sent(route)
    assert sent["ip"] == "127.0.0.1" and isinstance(sent["event_id"], str) and sent["event_id"]
    assert await client.query_instance("10.0.0.9") is None


async def test_query_worker_info(client: LMCacheClient, router: respx.MockRouter) -> None:
    infos = [{"instance_id": "a", "worker_id": 0, "ip": "127.0.0.1", "port": 5555}]
    route = router.post("/query_worker_info").mock(side_effect=[
        httpx.Response(200, json={"event_id": "w", "worker_infos": infos}),
        httpx.Response(200, json={"event_id": "w", "worker_infos": infos}),
        httpx.Response(200, json={"event_id": "w", "worker_infos": "nope"}),
    ])
    assert await client.query_worker_info() == infos
    assert _sent(route) == {"instance_id": "all"}
    assert await client.query_worker_info("a", [0, 1]) == infos
    assert _sent(route) == {"instance_id": "a", "worker_ids": [0, 1]}
    with pytest.raises(LMCacheResponseError):
        await client.query_worker_info()


async def test_evict_when_supported(client: LMCacheClient, router: respx.MockRouter) -> None:
    evict = router.post("/evict").respond(200, json={"event_id": "e", "num_tokens": 256})
    clear = router.post("/clear").respond(200, json={"event_id": "c", "num_tokens": 0})
    assert await client.evict("mlx-a", [1, 2, 3]) == "evicted"
    assert _sent(evict) == {"instance_id": "mlx-a", "tokens": [1, 2, 3], "location": "LocalCPUBackend"}
    assert not clear.called


async def test_evict_404_falls_back_to_clear(client: LMCacheClient, router: respx.MockRouter) -> None:
    evict = router.post("/evict").respond(404, json={"detail": "Not Found"})
    clear = router.post("/clear").respond(200, json={"event_id": "c", "num_tokens": 4096})
    assert await client.evict("vllm-1", [1, 2], location="LocalDiskBackend") == "cleared"
    assert evict.call_count == 1  # a 4xx is never retried
    assert _sent(clear) == {"instance_id": "vllm-1", "location": "LocalDiskBackend"}


async def test_evict_404_skip(router: respx.MockRouter) -> None:
    router.post("/evict").respond(404, json={"detail": "Not Found"})
    clear = router.post("/clear").respond(200, json={"event_id": "c", "num_tokens": 0})
    async with httpx.AsyncClient() as http:
        client = LMCacheClient(BASE, http, evict_fallback="skip", sleep=_no_sleep)
        assert await client.evict("vllm-1", [1]) == "skipped"
    assert not clear.called


async def test_evict_other_4xx_raises(client: LMCacheClient, router: respx.MockRouter) -> None:
    router.post("/evict").respond(422, json={"detail": "tokens must be a list"})
    clear = router.post("/clear").respond(200, json={"event_id": "c", "num_tokens": 0})
    with pytest.raises(LMCacheRequestError) as info:
        await client.evict("a", [1])
    assert info.value.status == 422 and info.value.detail == "tokens must be a list"
    assert not clear.called


async def test_base_url_trailing_slash(router: respx.MockRouter) -> None:
    route = router.post("/clear").respond(200, json={"event_id": "c", "num_tokens": 1})
    async with httpx.AsyncClient() as http:
        assert await LMCacheClient(BASE + "/", http).clear("a", "L") == 1
    assert route.called
