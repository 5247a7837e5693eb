"""InstanceMap: explicit / identity / query_instance mapping of LMCache instance ids."""

from __future__ import annotations

import pytest

from filters.instance_map import RETRY_AFTER, InstanceMap
from gateway.config import ClusterConfig, EndpointConfig
from gateway.endpoints import Endpoint, build_cluster


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def endpoints() -> list[Endpoint]:
    return build_cluster(ClusterConfig("llm", [
        EndpointConfig("a", "http://10.0.0.1:8000", lmcache_instance_id="vllm-a"),
        EndpointConfig("b", "http://10.0.0.2:8000"),
        EndpointConfig("c", "http://10.0.0.3:8000"),
        EndpointConfig("d", "http://10.0.0.3:8001"),
    ])).endpoints


@pytest.mark.parametrize("mode,expected", [
    ("explicit", {"vllm-a": "a", "b": "b", "c": "c", "d": "d"}),
    ("identity", {"a": "a", "b": "b", "c": "c", "d": "d"}),
])
def test_static_modes(mode: str, expected: dict[str, str]) -> None:
    assert InstanceMap(mode).to_endpoints(endpoints()) == expected  # type: ignore[arg-type]


async def test_query_instance_asks_unique_hosts_only_and_caches() -> None:
    asked: list[str] = []

    async def query(ip: str) -> str | None:
        asked.append(ip)
        return {"10.0.0.2": "engine-b"}.get(ip)

    clock = Clock()
    eps = endpoints()
    imap = InstanceMap("query_instance", query=query, all_endpoints=eps, refresh=60.0, clock=clock)
    # a has an explicit id; c and d share a host, so the controller cannot tell them apart
    assert imap.claim_stale(eps) == ["10.0.0.2"]
    assert imap.claim_stale(eps) == []  # pending: not claimed twice
    assert imap.to_endpoints(eps)["b"] == "b"  # unresolved: explicit/identity meanwhile
    assert await imap.resolve("10.0.0.2") == "engine-b"
    assert imap.to_endpoints(eps) == {"vllm-a": "a", "engine-b": "b", "c": "c", "d": "d"}
    clock.now += 59
    assert imap.claim_stale(eps) == []
    clock.now += 1
    assert imap.claim_stale(eps) == ["10.0.0.2"]
    assert asked == ["10.0.0.2"]


async def test_failed_query_keeps_the_old_answer_and_retries_soon() -> None:
    answers: list[str | Exception] = ["engine-b", RuntimeError("controller down")]

    async def query(ip: str) -> str | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    clock = Clock()
    eps = endpoints()
    imap = InstanceMap("query_instance", query=query, all_endpoints=eps, refresh=60.0, clock=clock)
    await imap.resolve("10.0.0.2")
    clock.now += 60
    with pytest.raises(RuntimeError):
        await imap.resolve(imap.claim_stale(eps)[0])
    assert imap.to_endpoints(eps)["engine-b"] == "b"
    assert imap.claim_stale(eps) == []
    clock.now += RETRY_AFTER
    assert imap.claim_stale(eps) == ["10.0.0.2"]
