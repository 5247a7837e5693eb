"""Filter registry: `@register("kebab-name")` on a Filter subclass; duplicates fail at import."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from filters.base import Filter, Services
from kvkernel.context import StateKey
from kvkernel.decode import ConfigError, decode_dataclass

F = TypeVar("F", bound=type[Filter])


class FilterSpec(Protocol):
    """One entry of the config's `filters:` list (`config` is decoded here)."""

    @property
    def type(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def config(self) -> Any: ...

_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_REGISTRY: dict[str, type[Filter]] = {}


def register(type_name: str) -> Callable[[F], F]:
    if not _KEBAB.match(type_name):
        raise ValueError(f"filter type {type_name!r} must be kebab-case")

    def wrap(cls: F) -> F:
        if type_name in _REGISTRY:
            first = _REGISTRY[type_name].__module__
            raise ValueError(f"filter type {type_name!r} registered twice ({first}, {cls.__module__})")
        cls.type_name = type_name
        _REGISTRY[type_name] = cls
        return cls

    return wrap


def registered() -> dict[str, type[Filter]]:
    import filters.builtins  # noqa: F401 - registers the built-ins

    return dict(_REGISTRY)


@dataclass(frozen=True, slots=True)
class FilterPlan:
    """A filter spec whose type exists and whose config decoded cleanly."""

    cls: type[Filter]
    name: str
    config: Any


def plan_filters(specs: Sequence[FilterSpec]) -> list[FilterPlan]:
    """Validate every `filters[i]` entry; ConfigError names `filters[i](type).config...`."""
    known = registered()
    plans: list[FilterPlan] = []
    names: set[str] = set()
    for i, spec in enumerate(specs):
        path = f"filters[{i}]"
        cls = known.get(spec.type)
        if cls is None:
            raise ConfigError(f"{path}.type", f"unknown filter type {spec.type!r} (known: {', '.join(sorted(known))})")
        name = spec.name or spec.type
        if name in names:
            raise ConfigError(f"{path}.name", f"filter name {name!r} used twice; give one of them a distinct `name`")
        names.add(name)
        plans.append(FilterPlan(cls, name, _decode_config(cls, spec.config, f"{path}({spec.type}).config")))
    return plans


def _decode_config(cls: type[Filter], raw: Any, path: str) -> Any:
    if cls.Config is None:
        if raw not in (None, {}):
            raise ConfigError(path, f"filter {cls.type_name!r} takes no config")
        return None
    return decode_dataclass(cls.Config, raw, path)


def check_chain(plans: Sequence[FilterPlan], required: Sequence[tuple[str, StateKey[Any]]] = ()) -> None:
    """Reject a chain that consumes typed state before any filter produced it.

    `required` lists (YAML path, key) pairs needed by something after the chain (a
    cluster's picker); each must be produced by some filter. Raises ConfigError.
    """
    produced: dict[StateKey[Any], str] = {}
    for i, plan in enumerate(plans):
        for key in plan.cls.consumes:
            if key not in produced:
                makers = [p.name for p in plans if key in p.cls.produces]
                where = f"a filter that produces it ({', '.join(makers)}) comes later" if makers \
                    else "no filter in the chain produces it"
                raise ConfigError(f"filters[{i}]({plan.cls.type_name})",
                                  f"needs {key.name!r} but {where}; reorder or add the producing filter")
        for key in plan.cls.produces:
            produced.setdefault(key, plan.name)
    for path, key in required:
        if key not in produced:
            raise ConfigError(path, f"needs {key.name!r} from the filter chain, but no filter produces it "
                                    f"(add the filters that do, e.g. prompt + tokenizer + kvcache)")


def build_filters(plans: Sequence[FilterPlan], services: Services) -> list[Filter]:
    return [plan.cls(plan.config, plan.name, services) for plan in plans]
