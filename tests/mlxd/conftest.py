"""Fixtures for MLX daemon tests: one seeded tiny model per session, real daemons as subprocesses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.procs import HOST, ManagedProcess, free_port, start_kvgate


class Daemon:
    """A running `kvgate mlx-serve` and its base URL."""

    def __init__(self, proc: ManagedProcess, port: int, instance_id: str) -> None:
        self.proc, self.port, self.instance_id = proc, port, instance_id
        self.url = f"http://{HOST}:{port}"


def start_daemon(model: Path, log_dir: Path, name: str, *extra: str) -> Daemon:
    port = free_port()
    proc = start_kvgate(name, ["mlx-serve", "--model", str(model), "--id", name, "--port", str(port),
                               "--host", HOST, *extra], log_dir)
    daemon = Daemon(proc, port, name)
    try:
        proc.wait_http(f"{daemon.url}/health", timeout=60)
    except BaseException:
        proc.kill()
        raise
    return daemon


@pytest.fixture(scope="session")
def daemon(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The shared daemon (default limits). Tests must not rely on its cache being empty."""
    d = start_daemon(tiny_model_dir, tmp_path_factory.mktemp("logs"), "mlx-main")
    yield d
    d.proc.stop()
