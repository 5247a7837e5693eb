"""`kvgate report`: totals equal the log's, every chart is drawn, compressed and malformed input."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import zstandard

from gateway.cli import main as kvgate
from kvreport.aggregate import Aggregator
from kvreport.html import CHARTS
from kvreport.sketch import HeavyHitters, LogHistogram
from tests.kvreport.synth import lines, records


def embedded_totals(html: str) -> dict:
    found = re.search(r'<script type="application/json" id="kvreport-totals">(.*?)</script>', html, re.S)
    assert found, "the report embeds its totals"
    return json.loads(found.group(1).replace("<\\/", "</"))


def expected_totals(recs: list[dict]) -> dict:
    tokens = {k: sum(r.get(k) or 0 for r in recs)
              for k in ("prompt_tokens", "cached_tokens", "completion_tokens", "predicted_cached_tokens")}
    return {"requests": len(recs), "tokens": tokens, "retries": sum(r.get("retries") or 0 for r in recs),
            "status": dict(Counter(str(r.get("status")) for r in recs)),
            "decisions": dict(Counter(str(r.get("decision") or "-") for r in recs)),
            "tiers": dict(Counter(str(r.get("tier") or "-") for r in recs)),
            "errors": sum(bool(r.get("error")) or (r.get("status") or 0) >= 500 for r in recs)}


def charts_in(html: str) -> list[str]:
    return re.findall(r'<svg class="chart" data-chart="([^"]+)"', html)


def test_totals_equal_the_logs_across_plain_gzip_and_zstd_files_with_malformed_lines(tmp_path: Path) -> None:
    all_lines = list(lines(3000, seed=1))
    plain, gz, zst = tmp_path / "access.jsonl", tmp_path / "access.jsonl.1.gz", tmp_path / "access.jsonl.2.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress("".join(all_lines[:1000]).encode()))
    gz.write_bytes(gzip.compress(("".join(all_lines[1000:2000]) + "{not json\n[1,2]\n").encode()))
    plain.write_text("".join(all_lines[2000:]) + "\n" + '{"time": "truncated')  # a line cut by a crash
    out = tmp_path / "report.html"

    assert kvgate(["report", str(zst), str(gz), str(plain), "-o", str(out), "--no-progress"]) == 0

    html = out.read_text()
    got = embedded_totals(html)
    want = expected_totals([json.loads(line) for line in all_lines])
    assert {k: got[k] for k in want} == want
    assert got["malformed"] == 3 and got["records"] == 3000
    assert set(charts_in(html)) == set(CHARTS)
    assert "3000" in html  # the summary table shows the total


def test_the_page_is_self_contained(tmp_path: Path) -> None:
    log = tmp_path / "a.jsonl"
    log.write_text("".join(lines(200)))
    out = tmp_path / "r.html"
    assert kvgate(["report", str(log), "-o", str(out), "--no-progress"]) == 0
    html = out.read_text()
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html)
    assert "http://" not in html and "https://" not in html


def test_time_buckets_stay_bounded_and_keep_every_request() -> None:
    agg = Aggregator(max_buckets=50)
    recs = list(records(5000, rate=2.0))  # 2500 s of traffic: 1-s buckets would be 2500
    for r in recs:
        agg.add(r)
    assert len(agg.buckets) <= 50
    assert agg.width == 64
    assert sum(b.requests for _, b in agg.series()) == len(recs)
    assert sum(b.tokens["prompt_tokens"] for _, b in agg.series()) == sum(r["prompt_tokens"] or 0 for r in recs)


def test_histogram_percentiles_within_five_percent() -> None:
    h = LogHistogram()
    values = [float(v) for v in range(1, 10001)]
    for v in values:
        h.add(v)
    for q in (0.5, 0.95, 0.99):
        exact = values[int(q * (len(values) - 1))]
        assert abs(h.quantile(q) - exact) / exact < 0.05  # type: ignore[operator]
    assert len(h.counts) < 200


def test_heavy_hitters_find_the_top_keys_in_bounded_space() -> None:
    hh = HeavyHitters(capacity=50)
    for i in range(20000):
        hh.add(f"hot{i % 5}" if i % 2 else f"cold{i}")
    assert not hh.exact and len(hh.counts) <= 100
    assert {k for k, _ in hh.top(5)} == {f"hot{i}" for i in range(5)}


def test_missing_file_is_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert kvgate(["report", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "r.html")]) == 2
    assert "no such file" in capsys.readouterr().err
