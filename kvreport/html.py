"""Render an `Aggregator` as one self-contained HTML page (inline CSS and SVG, no URLs).

The page embeds its totals as JSON (`<script type="application/json" id="kvreport-totals">`)
so tests and scripts can check them against the log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from html import escape
from typing import Any

from kvreport.aggregate import Aggregator, Bucket, Stats
from kvreport.reader import ReadStats
from kvreport.svg import bar_chart, line_chart

CHARTS = ("requests", "latency", "ttft", "status", "tokens", "cache-prediction", "prefill-saved", "tiers-time",
          "tiers", "decisions-time", "decisions", "failovers", "errors", "error-kinds", "endpoints", "prefixes")
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
_CSS = """body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.tick{font-size:10px;fill:#666}.legend{font-size:11px;fill:#333}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}.note{color:#666;font-size:12px}
.totals td{text-align:left}code{font-size:12px}"""
# For headless checks: errors (window.__errors, mirrored in <body data-errors>) and the charts drawn.
_ERRORS_JS = """window.__errors=[];addEventListener('error',function(e){window.__errors.push(String(e.message));
document.body.setAttribute('data-errors',JSON.stringify(window.__errors))});
addEventListener('DOMContentLoaded',function(){document.body.setAttribute('data-charts',
document.querySelectorAll('svg.chart').length)});"""


def totals(agg: Aggregator, read: ReadStats) -> dict[str, Any]:
    t = agg.total
    return {"lines": read.lines, "records": read.records, "malformed": read.malformed, "blank": read.blank,
            "requests": t.requests, "errors": t.errors, "retries": t.retries, "untimed": agg.untimed,
            "tokens": dict(t.tokens), "status": dict(t.status), "decisions": dict(t.decisions),
            "tiers": dict(t.tiers), "silent_misses": t.silent_misses, "failovers": t.failovers,
            "first": agg.first, "last": agg.last, "bucket_seconds": agg.width}


def _q(h: Any, q: float) -> float | None:
    v = h.quantile(q)
    return None if v is None else round(v, 3)


def time_series(agg: Aggregator) -> list[str]:
    rows = agg.series()
    xs = [x for x, _ in rows]
    b: list[Bucket] = [bucket for _, bucket in rows]
    w = agg.width

    def per_s(f: Any) -> list[float | None]:
        return [f(x) / w for x in b]

    codes = [c for c, _ in agg.total.status.most_common(8)]
    tiers = [c for c, _ in agg.total.tiers.most_common(8)]
    decisions = [c for c, _ in agg.total.decisions.most_common(8)]
    tok = {name: per_s(lambda x, n=name: x.tokens[n]) for name in ("prompt_tokens", "cached_tokens",
                                                                   "completion_tokens")}
    return [
        line_chart("requests", "Requests per second", xs, {"requests/s": per_s(lambda x: x.requests)}, "req/s"),
        line_chart("latency", "Latency percentiles", xs,
                   {name: [_q(x.latency, q) for x in b] for name, q in QUANTILES}, "ms"),
        line_chart("ttft", "Time to first token (first byte) percentiles", xs,
                   {name: [_q(x.ttft, q) for x in b] for name, q in QUANTILES}, "ms"),
        line_chart("status", "Status codes per second", xs,
                   {code: per_s(lambda x, c=code: x.status.get(c, 0)) for code in codes}, "req/s"),
        line_chart("tokens", "Tokens per second", xs, {k.removesuffix("_tokens"): v for k, v in tok.items()},
                   "tokens/s"),
        line_chart("cache-prediction", "Predicted vs actual cached tokens (silent-miss detector)", xs,
                   {"predicted": per_s(lambda x: x.tokens["predicted_cached_tokens"]),
                    "actual": per_s(lambda x: x.tokens["cached_tokens"]),
                    "silent misses/s": per_s(lambda x: x.silent_misses)}, "per s"),
        line_chart("prefill-saved", "Prefill saved: cached / prompt tokens", xs,
                   {"saved %": [100 * x.tokens["cached_tokens"] / x.tokens["prompt_tokens"]
                                if x.tokens["prompt_tokens"] else None for x in b]}, "%"),
        line_chart("tiers-time", "Cache tier mix", xs,
                   {t: per_s(lambda x, t=t: x.tiers.get(t, 0)) for t in tiers}, "req/s"),
        line_chart("decisions-time", "Routing decisions (overrides by load, balance, fail-over)", xs,
                   {d: per_s(lambda x, d=d: x.decisions.get(d, 0)) for d in decisions}, "req/s"),
        line_chart("failovers", "Fail-overs", xs, {"retries/s": per_s(lambda x: x.retries),
                                                    "failover decisions/s": per_s(lambda x: x.failovers)}, "per s"),
        line_chart("errors", "Errors and breaker-related replies", xs,
                   {"errors/s": per_s(lambda x: x.errors), "breaker/s": per_s(lambda x: x.breaker)}, "per s"),
    ]


def _stats_row(label: Sequence[str], s: Stats) -> str:
    prompt, cached = s.tokens["prompt_tokens"], s.tokens["cached_tokens"]
    cells = [*label, s.requests, s.errors, s.retries, _q(s.ttft, .5), _q(s.ttft, .95), _q(s.latency, .5),
             _q(s.latency, .95), prompt, cached, s.tokens["completion_tokens"],
             f"{100 * cached / prompt:.1f}%" if prompt else "-"]
    return "<tr>" + "".join(f"<td>{escape('-' if c is None else str(c))}</td>" for c in cells) + "</tr>"


def _table(head: Sequence[str], rows: list[str]) -> str:
    cols = [*head, "requests", "errors", "retries", "TTFT p50", "TTFT p95", "latency p50", "latency p95",
            "prompt tok", "cached tok", "completion tok", "prefill saved"]
    return "<table><tr>" + "".join(f"<th>{escape(c)}</th>" for c in cols) + "</tr>" + "".join(rows) + "</table>"


def breakdowns(agg: Aggregator) -> list[str]:
    t = agg.total
    em = sorted(agg.by_endpoint_model.items(), key=lambda kv: -kv[1].requests)
    routes = sorted(agg.by_route.items(), key=lambda kv: -kv[1].requests)
    exact = "exact" if agg.prefixes.exact else "approximate (lossy counting: counts may be low)"
    return [
        "<h2>Per endpoint and model</h2>",
        bar_chart("endpoints", "Requests per endpoint / model", [(f"{e} / {m}", s.requests) for (e, m), s in em[:20]]),
        _table(["endpoint", "model"], [_stats_row(k, s) for k, s in em]),
        "<h3>Per route</h3>", _table(["route", ""], [_stats_row((k, ""), s) for k, s in routes]),
        "<h2>Cache tier mix</h2>", bar_chart("tiers", "Requests per cache tier", t.tiers.most_common(20)),
        "<h2>Routing decisions</h2>",
        '<p class="note"><code>cache_hit_overridden_by_load</code> and <code>balance</code> are overrides by load; '
        "<code>failover:*</code> are later attempts after a failed one.</p>",
        bar_chart("decisions", "Requests per routing decision", t.decisions.most_common(20)),
        "<h2>Errors by kind</h2>", bar_chart("error-kinds", "Errors by kind", agg.error_kinds.most_common(20)),
        f"<h2>Top prefixes by traffic</h2><p class=\"note\">prompt_hash (model + prompt digest); {exact}.</p>",
        bar_chart("prefixes", "Requests per prompt hash", [(h[:16], n) for h, n in agg.prefixes.top(20)]),
    ]


def _page(title: str, body: Sequence[str], head: str = "") -> str:
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">{head}<title>{escape(title)}</title>"
            f"<script>{_ERRORS_JS}</script><style>{_CSS}</style></head><body>" + "\n".join(body))


def dashboard_page(agg: Aggregator, live_html: str) -> str:
    """The gateway's live `/dashboard`: `live_html` (trusted, already escaped) above the report's charts."""
    body = ["<h1>kvgate live dashboard</h1>", live_html, "<h2>Recent requests over time</h2>",
            *time_series(agg), *breakdowns(agg)]
    return _page("kvgate dashboard", body, '<meta http-equiv="refresh" content="5">') + "</body></html>\n"


def render(agg: Aggregator, read: ReadStats, sources: Sequence[str]) -> str:
    tot = totals(agg, read)
    tok = tot["tokens"]
    span = ""
    if agg.first is not None and agg.last is not None:
        fmt = "%Y-%m-%d %H:%M:%S UTC"
        span = f"{time.strftime(fmt, time.gmtime(agg.first))} – {time.strftime(fmt, time.gmtime(agg.last))}"
    saved = f"{100 * tok['cached_tokens'] / tok['prompt_tokens']:.1f}%" if tok["prompt_tokens"] else "-"
    summary = [("requests", tot["requests"]), ("malformed lines skipped", tot["malformed"]), ("time span", span),
               ("bucket width", f"{agg.width} s"), ("errors", tot["errors"]), ("retries", tot["retries"]),
               ("prompt tokens", tok["prompt_tokens"]), ("cached tokens", tok["cached_tokens"]),
               ("completion tokens", tok["completion_tokens"]),
               ("predicted cached tokens", tok["predicted_cached_tokens"]), ("prefill saved", saved),
               ("silent misses", tot["silent_misses"]), ("sources", ", ".join(sources))]
    body = ["<h1>kvgate ops report</h1>",
            '<table class="totals">' + "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>"
                                               for k, v in summary) + "</table>",
            "<h2>Over time</h2>", *time_series(agg), *breakdowns(agg)]
    data = json.dumps(tot, sort_keys=True).replace("</", "<\\/")
    embedded = f'<script type="application/json" id="kvreport-totals">{data}</script>'
    return _page("kvgate ops report", body) + embedded + "</body></html>\n"
