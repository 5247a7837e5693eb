"""`picker.config` of the `cache_aware` picker (also the short form's `cache_aware:` block)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvkernel.decode import FieldError, Seconds


@dataclass(frozen=True, slots=True)
class CacheAwareConfig:
    # "ttft": predicted time to first token per candidate (the default);
    # "tokens": the previous scoring in token units (cache_weight, load_weight, ...).
    scoring: Literal["ttft", "tokens"] = "ttft"
    # Both scorings: the saturation filter and the balance guard.
    balance_abs_threshold: int = 16
    balance_rel_threshold: float = 1.5
    max_waiting: int = 16
    max_kv_usage: float = 0.95
    # Share guard (scoring: ttft): an endpoint that took more than max_share times its fair
    # share (by learned prefill rate) of the last share_window picks is left out. 0: off.
    max_share: float = 1.5
    share_window: int = 64
    # scoring: tokens
    cache_weight: float = 1.0
    load_weight: float = 1.0
    prefill_tokens_per_request: int = 256
    # scoring: ttft — the prior every endpoint starts from, and how fast it forgets.
    prior_prefill_rate: float = 8000.0  # tokens/s
    prior_overhead: Seconds = 0.005
    forgetting: float = 0.98
    # Seconds charged per second of prefill a candidate would spend duplicating a prefix
    # another endpoint already holds. 1: the whole duplicated prefill, since every later
    # request at that endpoint waits behind it (and the copy evicts others' prefixes there).
    duplicate_weight: float = 1.0
    slo_header: str = "x-kvgate-ttft-slo-ms"  # per-request TTFT objective, in ms
    # Among candidates scored within max(tie_tolerance x best, tie_tolerance_min) of the best:
    # "rendezvous" picks by a hash of the prompt's new prefix, the same on every replica
    # (gateway/pickers/tie_break.py); "rotate" takes exact ties in turn (one replica's habit).
    tie_break: Literal["rendezvous", "rotate"] = "rendezvous"
    tie_tolerance: float = 0.1
    tie_tolerance_min: Seconds = 0.002
    # Delays from work this gateway did not send (another replica's, direct clients') are not
    # taken for a slower engine: a sample's prefill time starts at the engine's KV event that
    # scheduled it; without one, and while the engine's scraped gauges show such work, the
    # sample is not learned from and an overdue stream does not raise the rate for new
    # predictions. False: every delay after dispatch is the engine's speed.
    discount_foreign_load: bool = True

    def __post_init__(self) -> None:
        for name in ("cache_weight", "load_weight", "duplicate_weight"):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise FieldError(name, f"must be a number >= 0, got {value}")
        for name in ("balance_abs_threshold", "max_waiting", "prefill_tokens_per_request"):
            if getattr(self, name) < 0:
                raise FieldError(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.balance_rel_threshold >= 1:
            raise FieldError("balance_rel_threshold", f"must be >= 1, got {self.balance_rel_threshold}")
        if not 0 < self.max_kv_usage <= 1:
            raise FieldError("max_kv_usage", f"must be in (0, 1], got {self.max_kv_usage}")
        if not 0 < self.prior_prefill_rate < float("inf"):
            raise FieldError("prior_prefill_rate", f"must be a number > 0 (tokens/s), got {self.prior_prefill_rate}")
        if not 0 <= self.prior_overhead < 60:
            raise FieldError("prior_overhead", f"must be in [0, 60s), got {self.prior_overhead}")
        if not 0.5 <= self.forgetting <= 1:
            raise FieldError("forgetting", f"must be in [0.5, 1], got {self.forgetting}")
        if not (self.max_share == 0 or self.max_share >= 1):
            raise FieldError("max_share", f"must be 0 (off) or >= 1, got {self.max_share}")
        if self.share_window < 2:
            raise FieldError("share_window", f"must be >= 2, got {self.share_window}")
        if not 0 <= self.tie_tolerance <= 1:
            raise FieldError("tie_tolerance", f"must be in [0, 1] (of the best score), got {self.tie_tolerance}")
        if not 0 <= self.tie_tolerance_min < 1:
            raise FieldError("tie_tolerance_min", f"must be in [0, 1s), got {self.tie_tolerance_min}")
        if not self.slo_header:
            raise FieldError("slo_header", "must name a header")
