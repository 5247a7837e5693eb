"""Inline SVG charts (no JavaScript, no external files): time-series lines and bars."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from html import escape

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
W, H, LEFT, RIGHT, TOP, BOTTOM = 760, 240, 64, 150, 16, 36


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def _clock(ts: float, span: float) -> str:
    clock = time.strftime("%H:%M:%S" if span < 86400 else "%m-%d %H:%M", time.gmtime(ts))
    return f"{clock}.{int(ts % 1 * 10)}" if span < 10 else clock


def line_chart(chart_id: str, title: str, xs: Sequence[float], series: Mapping[str, Sequence[float | None]],
               unit: str = "") -> str:
    """Lines over time; `None` values are gaps. Every chart is an `<svg data-chart=...>`."""
    values = [v for ys in series.values() for v in ys if v is not None]
    top = max(values, default=0.0) or 1.0
    x0, x1 = (xs[0], xs[-1]) if xs else (0.0, 1.0)
    span = (x1 - x0) or 1.0
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / span * pw

    def py(y: float) -> float:
        return TOP + ph - y / top * ph

    parts = [f'<svg class="chart" data-chart="{escape(chart_id)}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
             f'role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>',
             f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>']
    for i in range(5):
        y = top * i / 4
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#e4e4e4"/>'
                     f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end" class="tick">{_fmt(y)}</text>')
    for i in range(5):
        x = x0 + span * i / 4
        parts.append(f'<text x="{px(x):.1f}" y="{H - 14}" text-anchor="middle" class="tick">{_clock(x, span)}</text>')
    parts.append(f'<text x="{LEFT}" y="{H - 2}" class="tick">UTC{(" · " + escape(unit)) if unit else ""}</text>')
    for n, (name, ys) in enumerate(series.items()):
        colour = COLOURS[n % len(COLOURS)]
        segments: list[list[str]] = [[]]
        for x, value in zip(xs, ys, strict=True):
            if value is None:
                segments.append([])
            else:
                segments[-1].append(f"{px(x):.1f},{py(value):.1f}")
        for seg in segments:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{colour}"/>')
            elif seg:
                parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{" ".join(seg)}"/>')
        ly = TOP + 14 + n * 16
        parts.append(f'<rect x="{W - RIGHT + 10}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{W - RIGHT + 24}" y="{ly}" class="legend">{escape(name[:20])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(chart_id: str, title: str, items: Sequence[tuple[str, float]], unit: str = "") -> str:
    """Horizontal bars, largest first as given."""
    rows = list(items) or [("(none)", 0.0)]
    top = max(v for _, v in rows) or 1.0
    row_h, label_w, bar_w = 20, 260, W - 260 - 90
    height = TOP + row_h * len(rows) + 8
    parts = [f'<svg class="chart" data-chart="{escape(chart_id)}" viewBox="0 0 {W} {height}" width="{W}" '
             f'height="{height}" role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>']
    for i, (label, value) in enumerate(rows):
        y = TOP + i * row_h
        width = value / top * bar_w
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end" class="legend">'
                     f'{escape(label[:40])}</text>'
                     f'<rect x="{label_w}" y="{y + 3}" width="{width:.1f}" height="{row_h - 6}" '
                     f'fill="{COLOURS[i % len(COLOURS)]}"/>'
                     f'<text x="{label_w + width + 4:.1f}" y="{y + 14}" class="tick">'
                     f'{_fmt(value)}{escape(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)
