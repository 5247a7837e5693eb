"""Routes: which cluster serves a request, by path prefix, the body's `model` and headers.

Routes are tried in config order; the first whose every condition holds wins. A
route an earlier one always pre-empts (no narrower condition of its own) is a config
error, as is a duplicate. Only the leaf `kvkernel.decode` is imported.

    routes:
      - match: {prefix: /v1/, model: [llama-3-8b, "llama-3-8b-*"], headers: {x-tenant: {regex: "team-.*"}}}
        cluster: llama
        rewrite_model: meta-llama/Meta-Llama-3-8B-Instruct   # the name the backend expects
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from kvkernel.decode import FieldError

_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class HeaderRegex:
    """`{regex: ...}`: the header's value must match the whole expression."""

    regex: str  # checked by `RouteMatch` (an error here would read as "not a string either")


@dataclass(frozen=True, slots=True)
class RouteMatch:
    prefix: str = "/"
    model: str | list[str] | None = None  # exact names or globs (`*`, `?`, `[...]`)
    headers: dict[str, str | HeaderRegex] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prefix.startswith("/"):
            raise FieldError("prefix", f"must start with '/', got {self.prefix!r}")
        if isinstance(self.model, list):
            if not self.model:
                raise FieldError("model", "must not be an empty list")
            for i, name in enumerate(self.model):
                if not name:
                    raise FieldError(f"model[{i}]", "must not be empty")
        elif self.model is not None and not self.model:
            raise FieldError("model", "must not be empty")
        for name, want in self.headers.items():
            if not name:
                raise FieldError("headers", "a header name must not be empty")
            if isinstance(want, HeaderRegex):
                try:
                    re.compile(want.regex)
                except re.error as exc:
                    raise FieldError(f"headers.{name}.regex", f"invalid regular expression {want.regex!r}: {exc}"
                                     ) from None

    @property
    def models(self) -> tuple[str, ...]:
        if self.model is None:
            return ()
        return (self.model,) if isinstance(self.model, str) else tuple(self.model)


@dataclass(frozen=True, slots=True)
class RouteConfig:
    match: RouteMatch
    cluster: str
    name: str | None = None  # the access log's `route` (default: the prefix)
    rewrite_model: str | None = None  # sent upstream as the body's `model`

    def __post_init__(self) -> None:
        if self.rewrite_model is not None and not self.rewrite_model:
            raise FieldError("rewrite_model", "must not be empty")
        if self.rewrite_model is not None and self.match.model is None:
            raise FieldError("rewrite_model", "needs `match.model` (the names this route rewrites)")


def is_glob(pattern: str) -> bool:
    return not _GLOB_CHARS.isdisjoint(pattern)


@dataclass(frozen=True, slots=True)
class Route:
    """A route ready to match: `label` is what the access log shows."""

    index: int
    label: str
    cluster: str
    prefix: str
    exact: tuple[str, ...]  # config order
    globs: tuple[str, ...]
    headers: tuple[tuple[str, str | re.Pattern[str]], ...]  # lower-case name, exact value or pattern
    rewrite_model: str | None

    @property
    def has_model(self) -> bool:
        return bool(self.exact or self.globs)

    def serves(self, model: str) -> bool:
        return model in self.exact or any(fnmatchcase(model, g) for g in self.globs)

    def matches_request(self, path: str, headers: Mapping[str, str]) -> bool:
        """Prefix and headers (the model aside)."""
        if not path.startswith(self.prefix):
            return False
        for name, want in self.headers:
            value = headers.get(name)
            if value is None:
                return False
            if isinstance(want, str):
                if value != want:
                    return False
            elif want.fullmatch(value) is None:
                return False
        return True

    def matches(self, path: str, headers: Mapping[str, str], model: str | None) -> bool:
        if self.has_model and (model is None or not self.serves(model)):
            return False
        return self.matches_request(path, headers)


def compile_route(index: int, config: RouteConfig) -> Route:
    match = config.match
    names = match.models
    headers = tuple((name.lower(), want if isinstance(want, str) else re.compile(want.regex))
                    for name, want in match.headers.items())
    return Route(index, config.name or match.prefix, config.cluster, match.prefix,
                 tuple(n for n in names if not is_glob(n)), tuple(n for n in names if is_glob(n)),
                 headers, config.rewrite_model)


class RouteTable:
    """The configured routes in order; the first match wins."""

    def __init__(self, configs: Sequence[RouteConfig]) -> None:
        self.routes = [compile_route(i, c) for i, c in enumerate(configs)]
        self.uses_models = any(r.has_model for r in self.routes)

    def match(self, path: str, headers: Mapping[str, str], model: str | None) -> Route | None:
        for route in self.routes:
            if route.matches(path, headers, model):
                return route
        return None

    def listing(self, path: str, headers: Mapping[str, str]) -> list[Route]:
        """Routes a `GET /v1/models` at this path speaks for (the model aside)."""
        return [r for r in self.routes if r.matches_request(path, headers)]


# --- shadowing: is every request `later` matches also matched by `earlier`? ---

def _pattern_covers(outer: str, inner: str) -> bool:
    """True only when every name `inner` matches, `outer` matches too (conservative)."""
    if not is_glob(inner):
        return fnmatchcase(inner, outer)
    if outer == inner or outer == "*":
        return True
    stem = outer[:-1]
    return outer.endswith("*") and not is_glob(stem) and inner.startswith(stem)


def _headers_cover(earlier: RouteMatch, later: RouteMatch) -> bool:
    theirs = {k.lower(): v for k, v in later.headers.items()}
    for name, want in earlier.headers.items():
        have = theirs.get(name.lower())
        if have is None:
            return False
        if isinstance(want, str):
            if have != want:
                return False
        elif isinstance(have, HeaderRegex):
            if have.regex != want.regex:
                return False
        elif re.fullmatch(want.regex, have) is None:
            return False
    return True


def shadows(earlier: RouteMatch, later: RouteMatch) -> bool:
    if not later.prefix.startswith(earlier.prefix):
        return False
    if earlier.model is not None:
        if later.model is None:
            return False
        if not all(any(_pattern_covers(o, i) for o in earlier.models) for i in later.models):
            return False
    return _headers_cover(earlier, later)


def check_routes(routes: Sequence[RouteConfig]) -> None:
    """Reject duplicate and unreachable routes (FieldError at `routes[i].match`)."""
    for j, later in enumerate(routes):
        for i, earlier in enumerate(routes[:j]):
            if not shadows(earlier.match, later.match):
                continue
            if shadows(later.match, earlier.match):
                raise FieldError(f"routes[{j}].match", f"duplicate of routes[{i}] (same conditions)")
            raise FieldError(f"routes[{j}].match",
                             f"unreachable: routes[{i}] comes first and matches every request this route "
                             f"matches (routes are tried in order; put the narrower route first)")
