"""Filter registry: `@register("kebab-name")` on a Filter subclass; duplicates fail at import."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from filters.base import Filter, Services
from kvkernel.context import StateKey
from kvkernel.decode import ConfigError
from kvkernel.plugins import PluginRegistry

F = TypeVar("F", bound=type[Filter])


class FilterSpec(Protocol):
    """One entry of the config's `filters:` list (`config` is decoded here)."""

    @property
    def type(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def config(self) -> Any: ...

_FILTERS: PluginRegistry[type[Filter]] = PluginRegistry("filter", r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$", "kebab-case")


def register(type_name: str) -> Callable[[F], F]:
    return _FILTERS.register(type_name)  # type: ignore[return-value]  # the subclass type narrows C


def registered() -> dict[str, type[Filter]]:
    import filters.builtins  # noqa: F401 - registers the built-ins

    return _FILTERS.known()


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
        plans.append(FilterPlan(cls, name, _FILTERS.decode_config(cls, spec.config, f"{path}({spec.type}).config")))
    return plans


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
