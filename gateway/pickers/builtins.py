"""Imports every built-in picker module so that their `@register_picker` decorators run."""

from gateway.pickers import cache_aware, consistent_hash, least_inflight, random_choice, round_robin  # noqa: F401
