"""A metric's labelled children, looked up once per label values.

prometheus-client's `metric.labels(*values)` validates and joins the values and takes
a lock on every call; a hot path that counts every request keeps the child instead.
For bounded label sets only (tiers, reasons, decision kinds, filter names).
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

C = TypeVar("C", covariant=True)


class Labelled(Protocol[C]):
    def labels(self, *labelvalues: str) -> C: ...


class Children(Generic[C]):
    """`children(*values)` is `metric.labels(*values)`, remembered."""

    __slots__ = ("_metric", "_found")

    def __init__(self, metric: Labelled[C]) -> None:
        self._metric = metric
        self._found: dict[tuple[str, ...], C] = {}

    def __call__(self, *values: str) -> C:
        found = self._found.get(values)
        if found is None:
            found = self._found[values] = self._metric.labels(*values)
        return found
