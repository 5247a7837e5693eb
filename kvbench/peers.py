"""The peer routers `kvgate bench routing` compares with: sglang-router and vllm-router.

Each lives in its own venv under `.peers/` (installed by `scripts/peer-routers.sh`,
never into the project's environment) and runs with its `cache_aware` policy at
its default thresholds, in front of the same sim-vllm fleet as kvgate.

What they need from the workers (sim-vllm), found by putting a logging relay in
between:

- sglang-router 0.3.2 (`sglang-router launch`): at start-up an HTTP/2 prior-knowledge
  probe (gRPC detection; sim-vllm answers it with a 400 and the router falls back to
  HTTP/1.1), `GET /health`, then `GET /server_info`, `/get_server_info`, `/model_info`,
  `/get_model_info`, all optional (404 -> model "unknown", no tokenizer; its
  cache-aware tree works on request text, so none is needed). Per request: the body is
  forwarded to the same path (`/v1/completions`, `/v1/chat/completions`; chat bodies get
  `max_completion_tokens`, which sim-vllm reads), the SSE stream passed through.
  Workers register asynchronously: ready when `/readiness` counts every worker healthy.
- vllm-router 0.1.17: at start-up `GET /health` on every worker, serving only once all
  answer. Per request under `cache_aware`: `POST /v1/completions/render` (or
  `/v1/chat/completions/render`), which a default vLLM does not serve either (404,
  scale-out endpoints are opt-in), then `POST /tokenize` with the prompt or messages,
  then the request itself. sim-vllm already serves /tokenize in both styles.
"""

from __future__ import annotations

import functools
import json
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.procs import HOST, http_ok

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT / ".peers"


@dataclass(frozen=True, slots=True)
class Peer:
    name: str  # the policy name in the suite
    executable: Path
    prefix: tuple[str, ...]  # argv between the executable and the common flags

    def argv(self, port: int, metrics_port: int, workers: Sequence[str]) -> list[str]:
        """The router's command line: cache_aware, 127.0.0.1 only, its own metrics port."""
        return [str(self.executable), *self.prefix, "--host", HOST, "--port", str(port),
                "--worker-urls", *workers, "--policy", "cache_aware",
                "--prometheus-host", HOST, "--prometheus-port", str(metrics_port),
                "--log-level", "warn" if self.name == "sglang-router" else "warning"]

    def wait_ready(self, url: str, workers: int, alive: object, timeout: float = 60.0) -> None:
        """Poll until the router routes to all `workers` (raise TimeoutError naming it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if callable(alive) and not alive():
                raise RuntimeError(f"{self.name} exited during start-up")
            if self._ready(url, workers):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready at {url} after {timeout}s")

    def _ready(self, url: str, workers: int) -> bool:
        if self.name != "sglang-router":
            return http_ok(url + "/health")
        try:
            with urllib.request.urlopen(url + "/readiness", timeout=1) as resp:  # noqa: S310 - loopback
                return int(json.load(resp).get("healthy_workers", 0)) >= workers
        except (OSError, ValueError):
            return False


PEERS = {
    "sglang-router": Peer("sglang-router", PEERS_DIR / "sglang-router" / "bin" / "sglang-router", ("launch",)),
    "vllm-router": Peer("vllm-router", PEERS_DIR / "vllm-router" / "bin" / "vllm-router", ()),
}


@functools.cache
def unavailable(name: str) -> str | None:
    """Why the peer `name` cannot run here (absent, or its --help fails), or None when it can."""
    peer = PEERS[name]
    if not peer.executable.exists():
        return f"{peer.executable} not found (run scripts/peer-routers.sh)"
    try:
        done = subprocess.run([str(peer.executable), *peer.prefix, "--help"], capture_output=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{peer.executable} does not run: {exc}"
    return None if done.returncode == 0 else f"{peer.executable} --help exited {done.returncode}"
