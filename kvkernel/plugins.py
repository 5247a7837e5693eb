"""The one mechanism behind the filter and picker registries: plugin classes registered
by type name (duplicates fail at import), and their `Config` decoded strictly.

A plugin class has a `type_name` (set on registration) and a `Config` dataclass, or
None when it takes no config.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from kvkernel.decode import ConfigError, decode_dataclass


class Plugin(Protocol):
    type_name: ClassVar[str]
    Config: ClassVar[type[Any] | None]


C = TypeVar("C", bound=type[Any])


class PluginRegistry(Generic[C]):
    """Type name -> class for one kind of plugin ("filter", "picker")."""

    def __init__(self, kind: str, name_pattern: str, name_rule: str) -> None:
        self.kind = kind
        self._pattern = re.compile(name_pattern)
        self._rule = name_rule
        self._classes: dict[str, C] = {}

    def register(self, type_name: str, aliases: Sequence[str] = ()) -> Callable[[C], C]:
        """Class decorator: the class answers to `type_name` and each alias."""
        for name in (type_name, *aliases):
            if not self._pattern.match(name):
                raise ValueError(f"{self.kind} type {name!r} must be {self._rule}")

        def wrap(cls: C) -> C:
            for name in (type_name, *aliases):
                if name in self._classes:
                    raise ValueError(f"{self.kind} type {name!r} registered twice "
                                     f"({self._classes[name].__module__}, {cls.__module__})")
                self._classes[name] = cls
            cls.type_name = type_name
            return cls

        return wrap

    def known(self) -> dict[str, C]:
        return dict(self._classes)

    def decode_config(self, cls: C, raw: Any, path: str) -> Any:
        """The plugin's decoded config (None when it takes none); ConfigError names `path`."""
        if cls.Config is None:
            if raw not in (None, {}):
                raise ConfigError(path, f"{self.kind} {cls.type_name!r} takes no config")
            return None
        return decode_dataclass(cls.Config, raw or {}, path)
