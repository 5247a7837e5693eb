"""Start `kvgate sim-vllm` backends as processes on free 127.0.0.1 ports (tests, demos)."""

from __future__ import annotations

import json
from pathlib import Path

from testbed.mock_lmcache.harness import ControllerProcess
from testbed.procs import HOST, ManagedProcess, free_ports, kvgate_cmd


def sim_argv(backend_id: str, port: int, controller: ControllerProcess | None, *extra: str) -> list[str]:
    argv = ["sim-vllm", "--id", backend_id, "--port", str(port), "--host", HOST, *extra]
    if controller is not None:
        argv += ["--lmcache-controller", HOST, "--lmcache-ports", json.dumps(controller.ports),
                 "--heartbeat-interval", "0.5"]
    return kvgate_cmd(*argv)


def start_sims(n: int, controller: ControllerProcess | None, log_dir: Path,
               *extra: str, prefix: str = "sim") -> dict[str, tuple[int, ManagedProcess]]:
    """`n` sim-vllm backends on free ports: id -> (port, process), ready to serve."""
    sims: dict[str, tuple[int, ManagedProcess]] = {}
    try:
        for i, port in enumerate(free_ports(n)):
            sim_id = f"{prefix}-{i}"
            proc = ManagedProcess(sim_id, sim_argv(sim_id, port, controller, *extra), log_dir / f"{sim_id}.log")
            sims[sim_id] = (port, proc.start())
        for port, proc in sims.values():
            proc.wait_http(f"http://{HOST}:{port}/health")
    except BaseException:
        for _, proc in sims.values():
            proc.stop()
        raise
    return sims
