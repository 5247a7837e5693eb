"""Picker registry: `@register_picker("name", aliases=(...))` on a Picker subclass;
duplicates fail at import. `plan_picker` decodes a cluster's picker block strictly."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.pickers.base import Picker
from kvkernel.decode import ConfigError, decode_dataclass

P = TypeVar("P", bound=type[Picker])
_NAME = re.compile(r"^[a-z][a-z0-9]*([_-][a-z0-9]+)*$")
_REGISTRY: dict[str, type[Picker]] = {}


def register_picker(type_name: str, aliases: Sequence[str] = ()) -> Callable[[P], P]:
    for name in (type_name, *aliases):
        if not _NAME.match(name):
            raise ValueError(f"picker type {name!r} must be lower case words joined by '_' or '-'")

    def wrap(cls: P) -> P:
        for name in (type_name, *aliases):
            if name in _REGISTRY:
                raise ValueError(f"picker type {name!r} registered twice "
                                 f"({_REGISTRY[name].__module__}, {cls.__module__})")
            _REGISTRY[name] = cls
        cls.type_name = type_name
        return cls

    return wrap


def registered_pickers() -> dict[str, type[Picker]]:
    import gateway.pickers.builtins  # noqa: F401 - registers the built-ins

    return dict(_REGISTRY)


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
    if cls.Config is None:
        if raw_config not in (None, {}):
            raise ConfigError(config_path, f"picker {type_name!r} takes no config")
        return PickerPlan(cls, None, type_path)
    return PickerPlan(cls, decode_dataclass(cls.Config, raw_config or {}, config_path), type_path)
