"""The packages' layers point one way: kernel <- filters <- gateway; the MLX daemon,
testbed and benchmarks sit beside the gateway, never under it.

Read from the source (every import statement, top level or inside a function), so
a lazy import cannot hide a wrong edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("kvkernel", "kvtok", "kvproto", "filters", "gateway", "mlxd", "testbed", "kvbench", "kvreport")

# package -> project packages it must never import
FORBIDDEN = {
    "kvkernel": set(PROJECT) - {"kvkernel"},
    "kvtok": set(PROJECT) - {"kvtok"},
    "kvproto": set(PROJECT) - {"kvproto"},
    "filters": {"gateway", "mlxd", "testbed", "kvbench", "kvreport"},
    "gateway": {"mlxd", "testbed", "kvbench"},  # kvreport: the live dashboard draws with it
    "mlxd": {"gateway", "filters", "testbed", "kvbench"},
    "kvreport": set(PROJECT) - {"kvreport"},  # reads logs only: usable without the gateway
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(PROJECT)


def edges(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): imported_packages(p) for p in sorted((ROOT / package).rglob("*.py"))}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_lower_layers(package: str) -> None:
    bad = {module: sorted(deps & FORBIDDEN[package]) for module, deps in edges(package).items()
           if deps & FORBIDDEN[package]}
    assert not bad, f"{package} imports what it must not: {bad}"


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from gateway.app import create_app\n    import testbed.procs\n")
    assert imported_packages(module) == {"gateway", "testbed"}


def test_gateway_cli_names_optional_parts_without_importing_them() -> None:
    """The gateway reaches the daemon, testbed and benchmarks only through the CLI's
    lazy "module:function" strings, which the import check above cannot see."""
    from gateway.cli import SUBCOMMANDS

    optional = {name for name, (target, _) in SUBCOMMANDS.items() if target.split(".")[0] != "gateway"}
    assert optional >= {"mlx-serve", "sim-vllm", "mock-lmcache", "bench"}
