"""Two `kvgate serve` replicas following the same two `kvgate sim-vllm` engines' KV events
(real processes on 127.0.0.1, no controller, no shared state): what one replica placed,
the other finds from the events alone, and a new prefix lands on the same engine
whichever replica receives it."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from testbed.procs import HOST, ManagedProcess, free_ports, start_kvgate
from tests.conftest import wait_until
from tests.gateway.test_kv_events_routing import kv_events_yaml

pytestmark = pytest.mark.slow


@dataclass
class Replicas:
    sims: dict[str, tuple[int, int, int]]  # id -> (http, events, replay) ports
    gateways: list[int]  # the replicas' ports

    def url(self, replica: int) -> str:
        return f"http://{HOST}:{self.gateways[replica]}"


def replica_yaml(sims: dict[str, tuple[int, int, int]], model: Path) -> str:
    """The same YAML for both replicas (each gets its port from `--port`)."""
    return kv_events_yaml(sims, model)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Replicas]:
    work = tmp_path_factory.mktemp("replicas")
    ports = free_ports(8)
    fleet = Replicas({"sim-a": (ports[0], ports[1], ports[2]), "sim-b": (ports[3], ports[4], ports[5])},
                     ports[6:8])
    procs: list[ManagedProcess] = []
    try:
        for sim_id, (http_port, events, replay) in fleet.sims.items():
            procs.append(start_kvgate(sim_id, ["sim-vllm", "--id", sim_id, "--port", str(http_port), "--model",
                                               str(tiny_model_dir), "--kv-events-port", str(events),
                                               "--kv-events-replay-port", str(replay)], work))
        for proc, (http_port, _, _) in zip(procs, fleet.sims.values(), strict=True):
            proc.wait_http(f"http://{HOST}:{http_port}/health")
        config = work / "gateway.yaml"
        config.write_text(replica_yaml(fleet.sims, tiny_model_dir))
        for i, port in enumerate(fleet.gateways):
            procs.append(start_kvgate(f"gateway-{i}", ["serve", "-c", str(config), "--port", str(port)], work))
        for i in range(len(fleet.gateways)):
            procs[len(fleet.sims) + i].wait_http(fleet.url(i) + "/readyz")
        yield fleet
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def text(seed: int, n: int = 300) -> str:
    rng = random.Random(seed)
    return f"Tenant {seed}:" + "".join(f" w{rng.randrange(10**6)}" for _ in range(n))


async def send(fleet: Replicas, http: httpx.AsyncClient, replica: int, prompt: str) -> tuple[str, int]:
    """The engine the replica chose and the engine's cached tokens."""
    resp = await http.post(fleet.url(replica) + "/v1/completions",
                           json={"model": "tiny", "prompt": prompt, "max_tokens": 2})
    assert resp.status_code == 200
    return resp.headers["x-kvgate-endpoint"], resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


async def indexed(fleet: Replicas, http: httpx.AsyncClient, replica: int, sim_id: str) -> int:
    status = (await http.get(fleet.url(replica) + "/kvgate/status")).json()
    return int(status["kv_events"][sim_id]["blocks"])


async def test_the_other_replica_follows_a_prefix_it_never_saw(replicas: Replicas, http: httpx.AsyncClient) -> None:
    shared = text(1)
    before = {sid: await indexed(replicas, http, 1, sid) for sid in replicas.sims}
    engine, _ = await send(replicas, http, 0, shared + " first question")

    async def arrived() -> bool:
        return await indexed(replicas, http, 1, engine) > before[engine]

    await wait_until(arrived, message=f"replica 1 indexed {engine}'s BlockStored events")
    again, cached = await send(replicas, http, 1, shared + " another question")
    assert again == engine and cached > 0


async def test_a_new_prefix_lands_on_the_same_engine_from_either_replica(replicas: Replicas,
                                                                         http: httpx.AsyncClient) -> None:
    """Idle engines, nobody holds the prefix: replica 0 places it by its placement key's hash;
    replica 1, with the engine's events already or not yet, chooses the same engine (the
    hash agrees across processes; before the rendezvous tie-break each replica took its
    own turn among near ties)."""
    for seed in range(10, 16):
        prompt = text(seed)
        first, _ = await send(replicas, http, 0, prompt + " from replica 0")
        second, _ = await send(replicas, http, 1, prompt + " from replica 1")
        assert second == first, f"seed {seed}: replica 0 chose {first}, replica 1 {second}"
