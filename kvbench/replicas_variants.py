"""The designs `kvgate bench replicas` compares in one run (`--variants`)."""

from __future__ import annotations

from dataclasses import dataclass

OLD_GAUGE = ("--queued-prefill-gauge", "running")
ROTATE = "tie_break: rotate"
ALL_DELAY_IS_SPEED = "discount_foreign_load: false"


@dataclass(frozen=True, slots=True)
class Variant:
    """A design to measure: the kvgate setup (`kvbench.fleet.KVGATE_SETUPS` or a picker type)
    with its picker config (a YAML flow mapping's items), the sims' extra flags and the
    replicas' engine-scrape interval."""

    setup: str
    picker_config: str = ""
    sim_args: tuple[str, ...] = ()
    metrics_interval: str = "500ms"
    what: str = ""


# Named designs, to compare in one run (`--variants`); any other name is a kvgate setup as is.
VARIANTS = {
    "cache_aware": Variant("cache_aware", what="the design now"),
    "before": Variant("cache_aware", f"{ROTATE}, {ALL_DELAY_IS_SPEED}", OLD_GAUGE,
                      what="before this work: exact ties rotate per replica, every delay at an engine teaches "
                           "that it is slower, sims count a queued prefill as running"),
    "no-tie-break": Variant("cache_aware", ROTATE, what="the design now but exact ties rotate per replica"),
    "old-gauge": Variant("cache_aware", sim_args=OLD_GAUGE,
                         what="the design now but sims count a queued prefill as running"),
    "all-delay-is-speed": Variant("cache_aware", ALL_DELAY_IS_SPEED,
                                  what="the design now but every delay at an engine teaches that it is slower "
                                       "(others' load not discounted)"),
    "no-share-guard": Variant("cache_aware", "max_share: 0", what="the design now without the share guard"),
    "share-window-192": Variant("cache_aware", "share_window: 192",
                                what="the design now, the share guard over the last 192 picks (default 64)"),
    "scrape-100ms": Variant("cache_aware", metrics_interval="100ms",
                            what="the design now, engines scraped every 100 ms"),
}


def variant(name: str) -> Variant:
    return VARIANTS.get(name) or Variant(name)
