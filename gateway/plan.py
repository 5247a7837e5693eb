"""From a decoded config to a checked plan: filter plans, one picker plan per cluster,
and the chain check (every consumed key has a producer before it; every picker's
needs are produced by the chain). Every error is a ConfigError naming a YAML path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from filters.registry import FilterPlan, check_chain, plan_filters
from gateway.config import ClusterConfig, GatewayConfig
from gateway.pickers.registry import PickerPlan, plan_picker
from kvkernel.context import StateKey
from kvkernel.decode import ConfigError

DEFAULT_PICKER = "least_inflight"


@dataclass(frozen=True, slots=True)
class GatewayPlan:
    config: GatewayConfig
    filters: list[FilterPlan]
    pickers: dict[str, PickerPlan]  # cluster name -> its picker


def plan_cluster_picker(cluster: ClusterConfig, i: int) -> PickerPlan:
    path = f"clusters[{i}]"
    if cluster.picker is not None:
        if cluster.cache_aware is not None:
            raise ConfigError(f"{path}.cache_aware", "with `picker:`, give the picker's settings in picker.config")
        return plan_picker(cluster.picker.type, cluster.picker.config, f"{path}.picker.type", f"{path}.picker.config")
    name = cluster.lb_policy or DEFAULT_PICKER
    if cluster.cache_aware is not None and name != "cache_aware":
        raise ConfigError(f"{path}.cache_aware", f"only used with lb_policy: cache_aware (this cluster uses {name!r})")
    raw = cluster.cache_aware if name == "cache_aware" else None
    return plan_picker(name, raw, f"{path}.lb_policy", f"{path}.cache_aware")


def plan_gateway(config: GatewayConfig, filters: Sequence[FilterPlan] | None = None) -> GatewayPlan:
    filter_plans = list(filters) if filters is not None else plan_filters(config.filters)
    pickers = {c.name: plan_cluster_picker(c, i) for i, c in enumerate(config.clusters)}
    required: list[tuple[str, StateKey[Any]]] = [
        (plan.path, key) for plan in pickers.values() for key in plan.cls.consumes
    ]
    check_chain(filter_plans, required)
    return GatewayPlan(config, filter_plans, pickers)
