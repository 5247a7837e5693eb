"""Picker registry: `@register_picker("name", aliases=(...))` on a Picker subclass;
duplicates fail at import. `plan_picker` decodes a cluster's picker block strictly."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.pickers.base import Picker
from kvkernel.decode import ConfigError
from kvkernel.plugins import PluginRegistry

P = TypeVar("P", bound=type[Picker])
_PICKERS: PluginRegistry[type[Picker]] = PluginRegistry("picker", r"^[a-z][a-z0-9]*([_-][a-z0-9]+)*$",
                                                        "lower case words joined by '_' or '-'")


def register_picker(type_name: str, aliases: Sequence[str] = ()) -> Callable[[P], P]:
    return _PICKERS.register(type_name, aliases)  # type: ignore[return-value]  # the subclass type narrows C


def registered_pickers() -> dict[str, type[Picker]]:
    import gateway.pickers.builtins  # noqa: F401 - registers the built-ins

    return _PICKERS.known()


@dataclass(frozen=True, slots=True)
class PickerPlan:
    """A picker type that exists and whose config decoded cleanly."""

    cls: type[Picker]
    config: Any
    path: str  # YAML path of the block, for later config errors (e.g. the chain check)

    def build(self) -> Picker:
        return self.cls(self.config)


def plan_picker(type_name: str, raw_config: Any, type_path: str, config_path: str) -> PickerPlan:
    known = registered_pickers()
    cls = known.get(type_name)
    if cls is None:
        raise ConfigError(type_path, f"unknown picker {type_name!r} (known: {', '.join(sorted(known))})")
    return PickerPlan(cls, _PICKERS.decode_config(cls, raw_config, config_path), type_path)
