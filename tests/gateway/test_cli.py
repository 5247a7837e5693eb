"""The dispatcher: `--version`, and one line naming the extra when an optional command's dependency is missing."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gateway import __version__, cli


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"kvgate {__version__}\n"


def test_the_fallback_version_matches_pyproject() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == __version__


@pytest.mark.parametrize(("command", "missing", "extra"), [
    ("mlx-serve", "mlx.core", "mlx"),
    ("demo", "numpy", "mlx"),
    ("bench", "psutil", "bench"),
    ("bench", "numpy", "mlx"),
    ("sim-vllm", "some_new_dependency", "testbed"),
])
def test_a_missing_third_party_module_names_its_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str, missing: str, extra: str
) -> None:
    def fails(target: str) -> object:
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    monkeypatch.setattr(cli, "_resolve", fails)
    assert cli.main([command, "--help"]) == 2
    assert capsys.readouterr().err == f"kvgate {command} needs the {extra!r} extra: pip install 'kvgate[{extra}]'\n"


@pytest.mark.parametrize(("command", "missing"), [("mlx-serve", "mlxd.gone"), ("serve", "numpy"), ("bench", None)])
def test_a_missing_project_module_or_a_base_command_still_raises(
    monkeypatch: pytest.MonkeyPatch, command: str, missing: str | None
) -> None:
    def fails(target: str) -> object:
        raise ModuleNotFoundError("No module", name=missing)

    monkeypatch.setattr(cli, "_resolve", fails)
    with pytest.raises(ModuleNotFoundError):
        cli.main([command])
