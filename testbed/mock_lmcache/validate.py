"""Request-body checks answering 422 `{"detail": [...]}` the way FastAPI/pydantic does.

Stricter than pydantic's lax mode on purpose: numbers must be JSON integers (not
strings or booleans), so a client that passes here also passes the real controller.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

STR = "str"
INTS = "ints"
OPT_INTS = "opt_ints"
PAIR = "pair"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    STR: (lambda v: isinstance(v, str), "Input should be a valid string"),
    INTS: (lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
           "Input should be a valid list of integers"),
    OPT_INTS: (lambda v: v is None or (isinstance(v, list) and all(_is_int(x) for x in v)),
               "Input should be null or a valid list of integers"),
    PAIR: (lambda v: isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v),
           "Input should be a [instance_id, location] pair of strings"),
    "opt_bool": (lambda v: v is None or isinstance(v, bool), "Input should be a valid boolean"),
}  # fmt: skip

_MISSING = object()
Spec = Mapping[str, str | tuple[str, Any]]


class BodyError(ValueError):
    """The request body does not fit; `details` is FastAPI's 422 detail list."""

    def __init__(self, details: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in details))
        self.details = details


async def read_body(request: web.Request, spec: Spec) -> dict[str, Any]:
    """The JSON object body checked against `spec` ({field: check | (check, default)})."""
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BodyError(
            [{"type": "json_invalid", "loc": ["body", 0], "msg": f"JSON decode error: {exc}"}]
        ) from exc
    except RecursionError as exc:  # too deeply nested: FastAPI answers 400 with this detail
        raise web.HTTPBadRequest(
            text=json.dumps({"detail": "There was an error parsing the body"}),
            content_type="application/json",
        ) from exc
    if not isinstance(raw, dict):
        raise BodyError([{"type": "model_attributes_type", "loc": ["body"],
                          "msg": "Input should be a valid dictionary or object"}])  # fmt: skip
    out: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for name, rule in spec.items():
        check, default = (rule, _MISSING) if isinstance(rule, str) else rule
        if name not in raw:
            if default is _MISSING:
                errors.append({"type": "missing", "loc": ["body", name], "msg": "Field required"})
            else:
                out[name] = default
            continue
        ok, msg = _CHECKS[check]
        if not ok(raw[name]):
            errors.append({"type": check, "loc": ["body", name], "msg": msg})
        out[name] = raw[name]
    if errors:
        raise BodyError(errors)
    return out
