"""Strict decoding of YAML data into frozen config dataclasses.

Every error names its YAML path (`filters[2](kvcache).config.retry.max_attempts: ...`).
Unknown keys are errors; durations are strings like "50ms" / "2s" / "5m" (or plain
seconds), sizes like "8MiB" (or plain bytes). Imports nothing else from the project.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

DURATION = "duration"
SIZE = "size"
Seconds = Annotated[float, DURATION]
Bytes = Annotated[int, SIZE]


class ConfigError(ValueError):
    """A config problem at a YAML path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


class FieldError(ValueError):
    """Raised by `__post_init__` checks: the decoder prefixes the field's YAML path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


_DURATION_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {
    "": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "k": 1024, "m": 1024**2, "g": 1024**3,
}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Zµ]*)\s*$")


def parse_duration(value: object, path: str = "") -> float:
    """Seconds from `"50ms"`, `"2s"`, `"5m"`, `"1h"`, `"100us"` or a number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(path, f"expected a duration like '50ms' or '2s', got {value!r}")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond float range
            seconds = math.inf
    elif isinstance(value, str) and (m := _NUMBER_UNIT.match(value)) and m.group(2) in _DURATION_UNITS:
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(path, f"expected a duration like '50ms', '2s' or '5m', got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(path, f"duration must be a finite number >= 0, got {value!r}")
    return seconds


def parse_size(value: object, path: str = "") -> int:
    """Bytes from `"8MiB"`, `"512KB"`, `"1GiB"` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ConfigError(path, f"expected a size like '8MiB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _NUMBER_UNIT.match(value)) and m.group(2).lower() in _SIZE_UNITS:
        number = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
        if not math.isfinite(number):
            raise ConfigError(path, f"size out of range, got {value!r}")
        size = int(number)
    else:
        raise ConfigError(path, f"expected a size like '8MiB' or '512KB', got {value!r}")
    if size < 0:
        raise ConfigError(path, f"size must be >= 0, got {value!r}")
    return size


def _type_name(tp: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", int: "integer", float: "number", bool: "boolean"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def decode(tp: Any, value: Any, path: str) -> Any:
    """Decode `value` as type `tp`; raise ConfigError naming `path` on any mismatch."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *marks = get_args(tp)
        if DURATION in marks:
            return parse_duration(value, path)
        if SIZE in marks:
            return parse_size(value, path)
        return decode(base, value, path)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _decode_union(tp, value, path)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(path, f"must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {_type_name(type(value))}")
        (item_tp,) = get_args(tp) or (Any,)
        return [decode(item_tp, item, f"{path}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {_type_name(type(value))}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {decode(key_tp, k, path): decode(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return decode_dataclass(tp, value, path)
    return _decode_scalar(tp, value, path)


def _decode_union(tp: Any, value: Any, path: str) -> Any:
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    options = [arg for arg in args if arg is not type(None)]
    if len(options) == 1:  # `X | None`: X's own error, with its full path
        return decode(options[0], value, path)
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return decode(arg, value, path)
        except ConfigError as exc:
            errors.append(exc.message)
    raise ConfigError(path, " or ".join(errors) if errors else f"unexpected value {value!r}")


def _decode_scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(path, f"expected {_type_name(tp)}, got {_type_name(type(value))} {value!r}")


def decode_dataclass(cls: type[T], value: Any, path: str) -> T:
    """Strictly decode a mapping into dataclass `cls` (unknown keys and missing required keys fail)."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected a mapping, got {_type_name(type(value))} {value!r}")
    hints = get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(value) - set(fields), key=str)
    if unknown:
        raise ConfigError(_join(path, str(unknown[0])), f"unknown key (allowed: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name in value:
            kwargs[name] = decode(hints[name], value[name], _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(path, name), "required key is missing")
    try:
        return cls(**kwargs)
    except FieldError as exc:
        raise ConfigError(_join(path, exc.field), str(exc)) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(path, str(exc)) from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of silently keeping the last."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if isinstance(key, list | dict):
            raise ConfigError("", f"a mapping key must be a scalar, got a {type(key).__name__} at line {line}")
        if key in seen:
            raise ConfigError("", f"duplicate key {key!r} at line {line}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str, source: str = "<config>") -> Any:
    """Parse YAML strictly (duplicate keys rejected); syntax errors become ConfigError."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{source}: invalid YAML: {exc}") from None


