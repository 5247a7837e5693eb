"""A gateway following two `kvgate sim-vllm` engines' KV events (real processes on
127.0.0.1, no LMCache controller): it knows where a prefix lives — on every replica —
without a round trip, and forgets an engine that restarted."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from testbed.procs import HOST, ManagedProcess, free_ports, start_kvgate
from tests.conftest import wait_until

pytestmark = pytest.mark.slow


@dataclass
class Fleet:
    sims: dict[str, tuple[int, int, int]]  # id -> (http, events, replay) ports
    procs: dict[str, ManagedProcess]
    gateway_port: int
    access_log: Path
    work: Path
    model: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.gateway_port}"

    def sim_url(self, sim_id: str) -> str:
        return f"http://{HOST}:{self.sims[sim_id][0]}"

    def start_sim(self, sim_id: str) -> ManagedProcess:
        http_port, events, replay = self.sims[sim_id]
        proc = start_kvgate(sim_id, ["sim-vllm", "--id", sim_id, "--port", str(http_port), "--model", str(self.model),
                                     "--kv-events-port", str(events), "--kv-events-replay-port", str(replay)],
                            self.work)
        proc.wait_http(f"http://{HOST}:{http_port}/health")
        self.procs[sim_id] = proc
        return proc

    def access(self) -> list[dict[str, Any]]:
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.strip()]


def gateway_yaml(fleet: Fleet) -> str:
    return kv_events_yaml(fleet.sims, fleet.model, fleet.gateway_port, fleet.access_log)


def kv_events_yaml(sims: dict[str, tuple[int, int, int]], model: Path, port: int = 0,
                   access_log: Path | None = None) -> str:
    """A `cache_aware` gateway following each sim's KV events (sim id -> http, events, replay ports)."""
    endpoints = "\n".join(
        f'      - {{id: {sid}, url: "http://{HOST}:{h}", kv_events: {{endpoint: "tcp://{HOST}:{e}", '
        f'replay_endpoint: "tcp://{HOST}:{r}"}}}}' for sid, (h, e, r) in sims.items())
    log = f'  - type: access-log\n    config: {{path: "{access_log}"}}\n' if access_log is not None else ""
    return f"""
server: {{host: {HOST}, port: {port}, debug_headers: true}}
clusters:
  - name: llm
    lb_policy: cache_aware
    health_check: {{path: /health, interval: 200ms, timeout: 1s}}
    endpoints:
{endpoints}
routes:
  - {{match: {{prefix: /v1/}}, cluster: llm}}
filters:
  - type: prompt
  - type: tokenizer
    config: {{backend: local, model_dir: "{model}"}}
  - type: kvcache
{log}"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("kv-events-routing")
    ports = free_ports(7)
    fleet = Fleet({"sim-a": tuple(ports[0:3]), "sim-b": tuple(ports[3:6])},  # type: ignore[dict-item]
                  {}, ports[6], work / "access.jsonl", work, tiny_model_dir)
    try:
        for sim_id in fleet.sims:
            fleet.start_sim(sim_id)
        config = work / "gateway.yaml"
        config.write_text(gateway_yaml(fleet))
        gateway = start_kvgate("gateway", ["serve", "-c", str(config)], work)
        fleet.procs["gateway"] = gateway
        gateway.wait_http(f"{fleet.url}/readyz")
        yield fleet
    finally:
        for proc in fleet.procs.values():
            proc.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def text(seed: int, n: int = 300) -> str:
    rng = random.Random(seed)
    return f"System {seed}:" + "".join(f" w{rng.randrange(10**6)}" for _ in range(n))


async def indexed_blocks(fleet: Fleet, http: httpx.AsyncClient) -> dict[str, int]:
    status = (await http.get(f"{fleet.url}/kvgate/status")).json()
    return {ep: info["blocks"] for ep, info in status["kv_events"].items()}


async def direct(fleet: Fleet, http: httpx.AsyncClient, sim_id: str, prompt: str) -> None:
    """Warm one engine by asking it directly: only its KV events tell the gateway."""
    resp = await http.post(fleet.sim_url(sim_id) + "/v1/completions",
                           json={"model": "tiny", "prompt": prompt, "max_tokens": 1})
    assert resp.status_code == 200


async def through_gateway(fleet: Fleet, http: httpx.AsyncClient, prompt: str) -> tuple[str, int, dict[str, Any]]:
    resp = await http.post(fleet.url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2},
                           headers={"x-request-id": f"r{random.getrandbits(48):x}"})
    assert resp.status_code == 200
    rid = resp.headers["x-request-id"]
    await wait_until(lambda: any(r["request_id"] == rid for r in fleet.access()), message="access-log line")
    record = next(r for r in fleet.access() if r["request_id"] == rid)
    return resp.headers["x-kvgate-endpoint"], resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"], record


async def test_a_prefix_warmed_behind_the_gateways_back_is_found_from_events(fleet: Fleet,
                                                                            http: httpx.AsyncClient) -> None:
    shared = text(1)
    before = await indexed_blocks(fleet, http)
    await direct(fleet, http, "sim-b", shared + " warm")

    async def indexed() -> bool:
        return (await indexed_blocks(fleet, http))["sim-b"] > before["sim-b"]

    await wait_until(indexed, message="sim-b's BlockStored events indexed by the gateway")
    endpoint, cached, record = await through_gateway(fleet, http, shared + " question")
    assert (endpoint, record["tier"], record["decision"]) == ("sim-b", "prefix-index", "cache_hit")
    assert cached > 0 and record["predicted_cached_tokens"] >= cached - 16  # block-precise, not 256-floored
    assert record["lookup_ms"] is None  # no controller, no round trip


async def test_every_replica_holding_a_prefix_is_known(fleet: Fleet, http: httpx.AsyncClient) -> None:
    shared = text(2)
    for sim_id in ("sim-a", "sim-b"):
        await direct(fleet, http, sim_id, shared + f" warm {sim_id}")

    async def both() -> bool:
        _, _, record = await through_gateway(fleet, http, shared + f" q{random.random()}")
        return set(record["matched_tokens"] or {}) == {"sim-a", "sim-b"}

    await wait_until(both, message="both replicas in the hints")


async def test_an_engine_restart_clears_what_the_gateway_knew_of_it(fleet: Fleet, http: httpx.AsyncClient) -> None:
    shared = text(3)
    await direct(fleet, http, "sim-a", shared + " warm")

    async def held() -> bool:
        return (await indexed_blocks(fleet, http))["sim-a"] > 0

    await wait_until(held, message="sim-a indexed")
    fleet.procs["sim-a"].stop()
    fleet.start_sim("sim-a")  # same ports, empty cache, seq from 0

    async def cleared() -> bool:
        return (await indexed_blocks(fleet, http))["sim-a"] == 0

    await wait_until(cleared, timeout=20, message="sim-a's blocks dropped after its restart")
    status = (await http.get(f"{fleet.url}/kvgate/status")).json()
    assert status["kv_events"]["sim-a"]["resets"] >= 1
