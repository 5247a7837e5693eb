"""deploy/kubernetes: every manifest validates against the Kubernetes schemas, every
file is part of a kustomization, and the manifests agree with the gateway: its config
passes the gateway's own check, the probes hit the gateway's paths, and the grace
period covers the preStop sleep plus the config's drain_timeout.

The kustomizations are assembled here in Python (resources, components and
configMapGenerator: all that deploy/ uses, and the assembler refuses anything else);
when `kubectl` is on PATH, `kubectl kustomize` must agree with it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import ValidationError, validate

from gateway.app import create_app
from gateway.config import GatewayConfig, load_config_text
from gateway.plan import plan_gateway

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
# What `kubectl apply -k` is documented for (docs/deployment.md).
ENTRY_POINTS = [KUBE, *sorted(p for p in (KUBE / "overlays").iterdir() if p.is_dir())]
# The oldest Kubernetes the manifests claim to support, and a recent one.
K8S_VERSIONS = ["1.30", "1.37"]
# Seconds left after preStop + drain_timeout for closing clients and the background queue.
MIN_GRACE_MARGIN = 5
TOKENIZER_DIR = "/models/tokenizer"  # model_dir in the ConfigMap's gateway.yaml
CONFIG_PATH = "/etc/kvgate/gateway.yaml"
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "components", "configMapGenerator"}

Resource = dict[str, Any]


# ---------------------------------------------------------------- the assembler

def _kustomization(directory: Path) -> dict[str, Any]:
    data = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(data) - KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: the test's assembler does not handle {sorted(unknown)}"
    return data


def build(directory: Path, used: set[Path] | None = None) -> list[Resource]:
    """The resources of a kustomization (or component) directory, as kustomize would
    emit them minus the generated names' hash suffix; `used` collects every file read."""
    used = used if used is not None else set()
    used.add(directory / "kustomization.yaml")
    data = _kustomization(directory)
    out: list[Resource] = []
    for entry in data.get("resources", []):
        path = (directory / entry).resolve()
        assert path.exists(), f"{directory}/kustomization.yaml lists {entry}, which does not exist"
        if path.is_dir():
            out += build(path, used)
        else:
            used.add(path)
            out += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for entry in data.get("components", []):
        path = (directory / entry).resolve()
        assert (path / "kustomization.yaml").is_file(), f"{directory}: component {entry} has no kustomization.yaml"
        assert _kustomization(path)["kind"] == "Component", f"{path} is listed as a component but is not one"
        out += build(path, used)
    for gen in data.get("configMapGenerator", []):
        files = {}
        for name in gen["files"]:
            path = (directory / name).resolve()
            assert path.is_file(), f"{directory}: configMapGenerator {gen['name']} lists missing {name}"
            used.add(path)
            files[path.name] = path.read_text()
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": files})
    return out


def find(resources: list[Resource], kind: str, name: str) -> Resource:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


@pytest.fixture(scope="module")
def base() -> list[Resource]:
    return build(KUBE)


@pytest.fixture(scope="module")
def example() -> list[Resource]:
    return build(KUBE / "overlays" / "example")


@pytest.fixture(scope="module")
def gateway_pod(base: list[Resource]) -> dict[str, Any]:
    spec: dict[str, Any] = find(base, "Deployment", "kvgate")["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def gateway_container(gateway_pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in gateway_pod["containers"] if c["name"] == "gateway")


@pytest.fixture(scope="module")
def gateway_config(base: list[Resource], tiny_model_dir: Path) -> GatewayConfig:
    """The ConfigMap's gateway YAML, its tokenizer pointed at a generated tiny model."""
    text = find(base, "ConfigMap", "kvgate-config")["data"]["gateway.yaml"]
    assert TOKENIZER_DIR in text
    config = load_config_text(text.replace(TOKENIZER_DIR, str(tiny_model_dir)), "deploy ConfigMap")
    plan_gateway(config)  # what `kvgate check-config` and `kvgate serve` run
    return config


# ---------------------------------------------------------------- structure

def test_every_file_in_deploy_is_part_of_a_kustomization() -> None:
    used: set[Path] = set()
    for entry in ENTRY_POINTS:
        build(entry, used)
    on_disk = {p.resolve() for p in DEPLOY.rglob("*") if p.is_file()}
    assert on_disk - used == set(), "files no kustomization lists"


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_resource_names_are_unique(entry: Path) -> None:
    keys = [(r["kind"], r["metadata"]["name"]) for r in build(entry)]
    assert len(keys) == len(set(keys))


# ---------------------------------------------------------------- schemas

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifests_validate_against_the_kubernetes_schemas(entry: Path, version: str) -> None:
    resources = build(entry)
    assert resources
    for resource in resources:
        # strict: an unknown or misspelt field is an error, not silently dropped
        validate(resource, version, strict=True)


def test_the_validator_rejects_a_misspelt_field(base: list[Resource]) -> None:
    deployment = json.loads(json.dumps(find(base, "Deployment", "kvgate")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(ValidationError):
        validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_the_validator_needs_no_network(base: list[Resource], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the schema validator tried the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for resource in base:
        validate(resource, K8S_VERSIONS[-1], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not on PATH")
@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_kubectl_kustomize_agrees(entry: Path) -> None:
    out = subprocess.run(["kubectl", "kustomize", str(entry)], capture_output=True, text=True, check=True).stdout
    built = [doc for doc in yaml.safe_load_all(out) if doc]

    generated = {r["metadata"]["name"] for r in built if r["kind"] == "ConfigMap"}

    def unhashed(r: Resource) -> tuple[str, str]:
        name = r["metadata"]["name"]  # kustomize appends a content hash to generated names
        return r["kind"], name.rsplit("-", 1)[0] if name in generated else name

    ours = build(entry)
    assert sorted(map(unhashed, built)) == sorted((r["kind"], r["metadata"]["name"]) for r in ours)
    config_map = next(r for r in built if r["kind"] == "ConfigMap")
    assert config_map["data"] == find(ours, "ConfigMap", "kvgate-config")["data"]
    volumes = find(built, "Deployment", "kvgate")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": config_map["metadata"]["name"]}} in volumes
    for resource in built:
        validate(resource, K8S_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------- the gateway's side

def test_the_configmap_config_passes_the_gateways_check(gateway_config: GatewayConfig) -> None:
    names = [f.type for f in gateway_config.filters]
    assert names == ["prompt", "tokenizer", "kvcache", "access-log"]
    assert gateway_config.clusters[0].lb_policy == "cache_aware"
    discovery = gateway_config.clusters[0].discovery
    assert discovery is not None and discovery.template.kv_events is not None  # the engines' KV events
    access_log = gateway_config.filters[-1].config
    assert access_log["path"] == "-", "the access log goes to stdout"
    assert gateway_config.server.host == "0.0.0.0"


def test_the_container_serves_the_mounted_config(gateway_container: dict[str, Any],
                                                 gateway_pod: dict[str, Any],
                                                 gateway_config: GatewayConfig) -> None:
    argv = gateway_container["command"] + gateway_container["args"]
    assert argv == ["kvgate", "serve", "-c", CONFIG_PATH]
    mounts = {m["mountPath"]: m for m in gateway_container["volumeMounts"]}
    volumes = {v["name"]: v for v in gateway_pod["volumes"]}
    config_mount = mounts[CONFIG_PATH]
    assert volumes[config_mount["name"]]["configMap"]["name"] == "kvgate-config"
    assert config_mount["subPath"] == "gateway.yaml"
    assert volumes[mounts["/etc/kvgate/keys"]["name"]]["secret"]["secretName"] == "kvgate-api-keys"
    # The tokenizer files: written by the initContainer, read by the gateway.
    tokenizer_volume = mounts[TOKENIZER_DIR]["name"]
    init_mounts = [m for c in gateway_pod["initContainers"] for m in c["volumeMounts"]]
    assert {"name": tokenizer_volume, "mountPath": TOKENIZER_DIR} in init_mounts
    ports = {p["name"]: p["containerPort"] for p in gateway_container["ports"]}
    assert ports["http"] == gateway_config.server.port


def test_the_probes_hit_the_gateways_own_paths(gateway_container: dict[str, Any],
                                               gateway_config: GatewayConfig) -> None:
    app = create_app(gateway_config, monitor=False)
    own_get_paths = {r.resource.canonical for r in app.router.routes()
                     if r.method == "GET" and r.resource is not None and "{" not in r.resource.canonical}
    probes = {kind: gateway_container[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["path"] in own_get_paths  # a gateway route, not the proxied catch-all
        assert probe["port"] == "http"


def test_the_grace_period_covers_prestop_and_drain(gateway_pod: dict[str, Any],
                                                   gateway_container: dict[str, Any],
                                                   gateway_config: GatewayConfig) -> None:
    command = gateway_container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert pre_stop > 0
    drain = gateway_config.server.drain_timeout
    grace = gateway_pod["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + drain + MIN_GRACE_MARGIN, (
        f"terminationGracePeriodSeconds {grace} < preStop {pre_stop} + drain_timeout {drain} "
        f"+ margin {MIN_GRACE_MARGIN}")


def test_the_pod_runs_locked_down(gateway_pod: dict[str, Any]) -> None:
    assert gateway_pod["securityContext"]["runAsNonRoot"] is True
    assert gateway_pod["securityContext"]["runAsUser"] != 0
    for container in gateway_pod["containers"] + gateway_pod["initContainers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert container["resources"]["requests"] and container["resources"]["limits"]
    writable = {v["name"] for v in gateway_pod["volumes"] if "emptyDir" in v}
    gateway = next(c for c in gateway_pod["containers"] if c["name"] == "gateway")
    assert {m["name"] for m in gateway["volumeMounts"] if m["mountPath"] == "/app/logs"} <= writable


def test_service_pdb_and_hpa_point_at_the_gateway(base: list[Resource]) -> None:
    deployment = find(base, "Deployment", "kvgate")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 2
    service = find(base, "Service", "kvgate")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(80, "http")]
    pdb = find(base, "PodDisruptionBudget", "kvgate")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = find(base, "HorizontalPodAutoscaler", "kvgate")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "kvgate"}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    gateway = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway")
    assert "cpu" in gateway["resources"]["requests"]  # CPU utilization is a share of the request


# ---------------------------------------------------------------- the example fleet

def _flag(args: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"{name}="))


def test_the_config_discovers_the_example_vllm_pods(example: list[Resource], gateway_config: GatewayConfig) -> None:
    """The gateway finds every pod of the StatefulSet through its headless Service's SRV
    records, and subscribes to the ports each pod publishes its KV events on."""
    sts = find(example, "StatefulSet", "vllm")
    headless = find(example, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    container = sts["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service_ports = {p["name"]: p for p in headless["spec"]["ports"]}
    (cluster,) = gateway_config.clusters
    assert cluster.endpoints == [] and cluster.discovery is not None
    dns, template = cluster.discovery.dns, cluster.discovery.template
    assert dns is not None and dns.record == "SRV" and dns.nameservers is None  # the pod's own resolver
    port_name, proto, service = dns.name.split(".")
    assert (proto, service) == ("_tcp", headless["metadata"]["name"])
    assert service_ports[port_name.lstrip("_")]["targetPort"] == "http"  # SRV gives the pods' vLLM port
    assert template.kind == "vllm" and template.kv_events is not None
    assert (template.kv_events.port, template.kv_events.replay_port) == (ports["kv-events"], ports["kv-replay"])


def test_vllm_publishes_what_the_gateway_subscribes_to(example: list[Resource], gateway_pod: dict[str, Any]) -> None:
    container = find(example, "StatefulSet", "vllm")["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert "--enable-prefix-caching" in args
    assert _flag(args, "--block-size") == "16"
    events = json.loads(_flag(args, "--kv-events-config"))
    assert events == {"enable_kv_cache_events": True, "publisher": "zmq",
                      "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # The gateway tokenizes with the engines' tokenizer: same model, same revision.
    fetch = next(c for c in gateway_pod["initContainers"] if c["name"] == "fetch-tokenizer")
    env = {e["name"]: e["value"] for e in fetch["env"] if "value" in e}
    assert args[0] == env["MODEL"]
    assert _flag(args, "--revision") == env["REVISION"]


def test_the_lmcache_controller_is_where_the_config_looks(example: list[Resource],
                                                         gateway_config: GatewayConfig) -> None:
    controller = find(example, "Deployment", "lmcache-controller")
    container = controller["spec"]["template"]["spec"]["containers"][0]
    argv = shlex.join(container["command"] + container["args"])
    assert argv == ("lmcache_controller --host 0.0.0.0 --port 9000 --monitor-ports "
                    "'{\"pull\":9001,\"reply\":9002,\"heartbeat\":9003}'")
    service = find(example, "Service", "lmcache-controller")
    kvcache = next(f for f in gateway_config.filters if f.type == "kvcache")
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http")
    assert kvcache.config["lmcache_endpoint"] == f"http://{service['metadata']['name']}:{port}"
    redis = find(example, "Service", "redis")
    assert [p["port"] for p in redis["spec"]["ports"]] == [6379]
