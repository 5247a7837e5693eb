"""A fresh fleet per (workload, policy): mock LMCache, sim-vllm backends, one router.

`open_fleet` starts everything on free 127.0.0.1 ports and yields a `Fleet` with
the router's URL; leaving the context stops every process it started, in reverse
order. Every policy gets the same fleet shape (the sims always report their
chunks to a mock LMCache), so the only difference between runs is the router.

A policy name is one of `oracle`, a peer router (`sglang-router`, `vllm-router`),
or a kvgate setup (`KVGATE_SETUPS`), or else a kvgate picker type passed straight
into the gateway YAML with the full cache chain, so a new picker is benchmarked by
naming it (`--policies my_picker`).

Every sim loads the same tokenizer (a generated tiny model, `FleetShape.model_dir`)
and publishes its KV events; kvgate setups that use them subscribe, tokenize in
process with the same files and ask the controller off the request path.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvbench.peers import PEERS
from testbed.mock_lmcache.harness import ControllerProcess, start_mock_controller
from testbed.procs import HOST, ManagedProcess, free_ports, kvgate_cmd, start_kvgate

ORACLE = "oracle"
# kvgate baselines: no cache filters
NOT_CACHE_AWARE = frozenset({"round_robin", "least_inflight", "random", "consistent_hash"})


@dataclass(frozen=True, slots=True)
class FleetShape:
    backends: int = 4
    slow_backends: int = 0
    capacity_blocks: int = 1000  # x 16 tokens per block
    prefill_rate: float = 8000.0  # tokens/s; slow backends run at a tenth
    max_num_seqs: int = 16
    model_dir: str | None = None  # the sims' (and kvgate's local) tokenizer; None: the hash tokenizer
    sim_args: tuple[str, ...] = ()  # extra `kvgate sim-vllm` flags for every backend


@dataclass(slots=True)
class Fleet:
    url: str  # the router's base URL
    sims: dict[str, str] = field(default_factory=dict)  # backend id -> base URL
    access_log: Path | None = None  # kvgate only


@dataclass(frozen=True, slots=True)
class Sim:
    url: str
    events: int  # KV-event PUB port
    replay: int  # KV-event replay port


# kvgate setups by name: (cluster picker block, uses the engines' events + local tokenizer).
KVGATE_SETUPS: dict[str, tuple[str, bool]] = {
    "cache_aware": ("picker: {type: cache_aware}", True),
    # The previous scoring, same inputs: isolates the picker.
    "cache_aware_tokens": ("picker: {type: cache_aware, config: {scoring: tokens}}", True),
    # The first round's whole setup: remote /tokenize and an LMCache /lookup per request, token scoring.
    "cache_aware_v1": ("picker: {type: cache_aware, config: {scoring: tokens}}", False),
}


def is_kvgate(policy: str) -> bool:
    return policy != ORACLE and policy not in PEERS


def label(policy: str) -> str:
    """How a policy is named in tables: `kvgate cache_aware`, `oracle`, `sglang-router cache_aware`."""
    if policy == ORACLE:
        return ORACLE
    return f"{policy} cache_aware" if policy in PEERS else f"kvgate {policy}"


def gateway_yaml(policy: str, sims: dict[str, Sim], port: int, access_log: Path, controller_url: str,
                 model_dir: str | None = None, metrics_interval: str = "500ms", picker_config: str = "") -> str:
    """kvgate's config for `policy`: the cache filters for every policy but the plain baselines.
    `picker_config` (a YAML flow mapping) becomes the picker's `config:`."""
    picker, modern = KVGATE_SETUPS.get(policy, (f"picker: {{type: {policy}}}", True))
    if picker_config:
        picker = f"picker: {{type: {policy}, config: {picker_config}}}"
    modern = modern and model_dir is not None
    endpoints = "\n".join(f'      - {{id: {sid}, url: "{sim.url}"' + (
        f', kv_events: {{endpoint: "tcp://{HOST}:{sim.events}", replay_endpoint: "tcp://{HOST}:{sim.replay}"}}'
        if modern and policy not in NOT_CACHE_AWARE else "") + "}" for sid, sim in sims.items())
    first = next(iter(sims.values())).url
    tokenizer = f'{{backend: local, model_dir: "{model_dir}"}}' if modern else \
        f'{{backend: remote, endpoint: "{first}", timeout: 500ms}}'
    lookup = "auto" if modern else "on_request"
    cache_filters = "" if policy in NOT_CACHE_AWARE else f"""
  - type: tokenizer
    config: {tokenizer}
  - type: kvcache
    config: {{lmcache_endpoint: "{controller_url}", lookup_timeout: 50ms, controller_lookup: {lookup}}}"""
    cluster = f"lb_policy: {policy}" if policy in NOT_CACHE_AWARE else picker
    return f"""
server: {{host: {HOST}, port: {port}}}
clusters:
  - name: llm
    {cluster}
    health_check: {{path: /health, interval: 1s, timeout: 1s}}
    metrics_interval: {metrics_interval}
    timeouts: {{connect: 1s, first_byte: 120s}}
    endpoints:
{endpoints}
routes:
  - {{match: {{prefix: /v1/}}, cluster: llm}}
filters:
  - type: prompt{cache_filters}
  - type: access-log
    config: {{path: "{access_log}"}}
"""


def _sim_argv(sim_id: str, port: int, events: tuple[int, int], controller: ControllerProcess, shape: FleetShape,
              slow: bool) -> list[str]:
    rate = shape.prefill_rate / 10 if slow else shape.prefill_rate
    model = ["--model", shape.model_dir, "--served-model-name", "sim-vllm"] if shape.model_dir else []
    return kvgate_cmd("sim-vllm", "--id", sim_id, "--port", str(port), "--host", HOST, *model,
                      "--kv-events-port", str(events[0]), "--kv-events-replay-port", str(events[1]),
                      "--capacity-blocks", str(shape.capacity_blocks), "--prefill-rate", str(rate),
                      "--max-num-seqs", str(shape.max_num_seqs),
                      "--lmcache-controller", HOST, "--lmcache-ports", json.dumps(controller.ports),
                      "--heartbeat-interval", "0.5", "--log-level", "WARNING", *shape.sim_args)


def start_fleet_sims(stack: contextlib.ExitStack, shape: FleetShape, controller: ControllerProcess,
                log_dir: Path) -> dict[str, Sim]:
    sims: dict[str, Sim] = {}
    procs = []
    ports = free_ports(3 * shape.backends)
    for i in range(shape.backends):
        port, events = ports[3 * i], (ports[3 * i + 1], ports[3 * i + 2])
        slow = i >= shape.backends - shape.slow_backends
        sim_id = f"{'slow' if slow else 'sim'}-{i}"
        proc = ManagedProcess(sim_id, _sim_argv(sim_id, port, events, controller, shape, slow),
                              log_dir / f"{sim_id}.log")
        stack.callback(proc.stop)
        procs.append((proc.start(), port))
        sims[sim_id] = Sim(f"http://{HOST}:{port}", *events)
    for proc, port in procs:
        proc.wait_http(f"http://{HOST}:{port}/health")
    return sims


def _start_router(stack: contextlib.ExitStack, policy: str, sim_ports: dict[str, Sim], controller: ControllerProcess,
                  log_dir: Path, model_dir: str | None) -> Fleet:
    sims = {sid: sim.url for sid, sim in sim_ports.items()}
    port, metrics_port = free_ports(2)
    url = f"http://{HOST}:{port}"
    if policy == ORACLE:
        argv = [sys.executable, "-m", "kvbench.oracle", "--port", str(port)]
        for sim_url in sims.values():
            argv += ["--backend", sim_url]
        proc = ManagedProcess(ORACLE, argv, log_dir / "oracle.log")
        stack.callback(proc.stop)
        proc.start().wait_http(url + "/healthz")
        return Fleet(url, sims)
    if policy in PEERS:
        peer = PEERS[policy]
        proc = ManagedProcess(policy, peer.argv(port, metrics_port, list(sims.values())), log_dir / f"{policy}.log")
        stack.callback(proc.stop)
        peer.wait_ready(url, len(sims), proc.start().alive)
        return Fleet(url, sims)
    access_log = log_dir / "access.jsonl"
    config = log_dir / "gateway.yaml"
    config.write_text(gateway_yaml(policy, sim_ports, port, access_log, controller.url, model_dir))
    gateway = start_kvgate("gateway", ["serve", "-c", str(config)], log_dir)
    stack.callback(gateway.stop)
    gateway.wait_http(url + "/readyz")
    return Fleet(url, sims, access_log)


@contextlib.contextmanager
def open_fleet(policy: str, shape: FleetShape, log_dir: Path) -> Iterator[Fleet]:
    """Controller, sims and router for `policy`, ready to serve; all stopped on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        controller = start_mock_controller(log_dir)
        stack.callback(controller.stop)
        sims = start_fleet_sims(stack, shape, controller, log_dir)
        yield _start_router(stack, policy, sims, controller, log_dir, shape.model_dir)
