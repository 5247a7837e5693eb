"""The plugin registry behind filters and pickers: names, duplicates, aliases, strict configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from kvkernel.decode import ConfigError
from kvkernel.plugins import PluginRegistry


class _Base:
    type_name: ClassVar[str] = ""
    Config: ClassVar[type[Any] | None] = None


@dataclass(frozen=True)
class _Conf:
    weight: int = 1


def _registry() -> PluginRegistry[type[_Base]]:
    return PluginRegistry("widget", r"^[a-z]+(-[a-z]+)*$", "kebab-case")


def test_registered_under_its_name_and_aliases() -> None:
    reg = _registry()

    @reg.register("main-name", aliases=("old-name",))
    class Widget(_Base):
        pass

    assert Widget.type_name == "main-name"
    assert reg.known() == {"main-name": Widget, "old-name": Widget}
    reg.known().clear()  # a copy: the registry itself is untouched
    assert "main-name" in reg.known()


def test_a_bad_name_or_a_second_registration_fails_at_import() -> None:
    reg = _registry()
    with pytest.raises(ValueError, match="widget type 'Bad_Name' must be kebab-case"):
        reg.register("Bad_Name")
    reg.register("one")(type("A", (_Base,), {}))
    with pytest.raises(ValueError, match="widget type 'one' registered twice"):
        reg.register("one")(type("B", (_Base,), {}))


def test_configs_decode_strictly_with_the_yaml_path() -> None:
    reg = _registry()

    @reg.register("plain")
    class Plain(_Base):
        pass

    @reg.register("tuned")
    class Tuned(_Base):
        Config = _Conf

    assert reg.decode_config(Plain, None, "x.config") is None
    assert reg.decode_config(Plain, {}, "x.config") is None
    with pytest.raises(ConfigError) as err:
        reg.decode_config(Plain, {"a": 1}, "clusters[0].picker.config")
    assert err.value.path == "clusters[0].picker.config" and "widget 'plain' takes no config" in str(err.value)
    assert reg.decode_config(Tuned, {"weight": 3}, "p") == _Conf(3)
    assert reg.decode_config(Tuned, None, "p") == _Conf()
    with pytest.raises(ConfigError) as err:
        reg.decode_config(Tuned, {"wieght": 3}, "filters[2](tuned).config")
    assert err.value.path.startswith("filters[2](tuned).config")
