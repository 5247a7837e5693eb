"""Per-(workload, policy) results of the routing suite and how they are measured.

Hit ratio = sum of `cached_tokens` / sum of `prompt_tokens` from the responses;
requests per backend come from each sim's own `vllm:request_success_total`
(so they count the same for every router, peers included); kvgate's routing
decisions come from its access log.
"""

from __future__ import annotations

import json
import statistics
import sys
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvbench.client import Sample

_SUCCESS = "vllm:request_success_total"
_TTFT = "vllm:time_to_first_token_seconds"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of `values`; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def backend_requests(sims: dict[str, str]) -> dict[str, int]:
    """Requests each sim has finished so far, from its /metrics."""
    counts = {}
    for sim_id, url in sims.items():
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:  # noqa: S310 - loopback only
            text = resp.read().decode()
        counts[sim_id] = int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                 if line.startswith(_SUCCESS + "{")))
    return counts


def engine_ttft(sims: dict[str, str]) -> tuple[float, int]:
    """Sum (s) and count of the sims' own time-to-first-token histograms (queue + prefill at
    the engine, no router or network), over every sim."""
    total, count = 0.0, 0
    for url in sims.values():
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:  # noqa: S310 - loopback only
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith(_TTFT + "_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith(_TTFT + "_count"):
                count += int(float(line.rsplit(" ", 1)[1]))
    return total, count


def access_log_decisions(path: Path | None) -> dict[str, int]:
    """kvgate's routing decisions by kind ({} when there is no access log)."""
    if path is None or not path.exists():
        return {}
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        counts[str(json.loads(line).get("decision"))] += 1
    return dict(counts.most_common())


@dataclass(slots=True)
class PolicyResult:
    workload: str
    policy: str
    label: str
    samples: list[Sample] = field(default_factory=list)
    elapsed_s: float = 0.0
    per_backend: dict[str, int] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=dict)
    skipped: str | None = None  # why this policy did not run

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.error is None]

    @property
    def errors(self) -> int:
        return len(self.samples) - len(self.ok)

    @property
    def hit_ratio(self) -> float:
        prompt = sum(s.prompt_tokens for s in self.ok)
        return sum(s.cached_tokens for s in self.ok) / prompt if prompt else 0.0

    def summary(self) -> dict[str, Any]:
        """The numbers in the tables and the JSON."""
        ttft = [s.ttft_ms for s in self.ok]
        e2e = [s.e2e_ms for s in self.ok]
        loads = list(self.per_backend.values())
        return {
            "requests": len(self.samples), "errors": self.errors, "hit_ratio": round(self.hit_ratio, 4),
            "ttft_p50_ms": percentile(ttft, 0.5), "ttft_p90_ms": percentile(ttft, 0.9),
            "ttft_p99_ms": percentile(ttft, 0.99), "e2e_p50_ms": percentile(e2e, 0.5),
            "e2e_p99_ms": percentile(e2e, 0.99),
            "throughput_rps": len(self.ok) / self.elapsed_s if self.elapsed_s else 0.0,
            "backend_max": max(loads, default=0),
            "backend_mean": statistics.fmean(loads) if loads else 0.0,
            "elapsed_s": self.elapsed_s,
        }

    def to_json(self, samples: bool = True) -> dict[str, Any]:
        """Summary, per-backend counts, decisions, the TTFT CDF at every percent, and (if `samples`)
        every sample; `from_json` reads it back (without samples: summary only)."""
        ttft = [s.ttft_ms for s in self.ok]
        return {"workload": self.workload, "policy": self.policy, "label": self.label, "skipped": self.skipped,
                **({} if self.skipped else self.summary()), "per_backend": self.per_backend,
                "decisions": self.decisions, "errors_sample": [s.error for s in self.samples if s.error][:5],
                "ttft_cdf_ms": [round(percentile(ttft, q / 100), 1) for q in range(1, 101)] if ttft else [],
                **({"samples": [asdict(s) for s in self.samples]} if samples else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PolicyResult:
        """A result written by `to_json(samples=True)`."""
        return cls(data["workload"], data["policy"], data["label"], [Sample(**s) for s in data.get("samples", [])],
                   float(data.get("elapsed_s", 0.0)), data["per_backend"], data["decisions"], data["skipped"])


def progress_bar(total: int, enabled: bool) -> object:
    """A tqdm bar over `total` requests on stderr; None when disabled or tqdm is absent."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)
