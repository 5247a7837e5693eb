"""`kvgate report LOG... -o report.html`: an offline ops report from JSONL access logs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kvreport.aggregate import Aggregator
from kvreport.html import render
from kvreport.reader import Progress, ReadStats, iter_records


def build_report(paths: Sequence[Path], progress: bool = False, max_buckets: int = 600) -> tuple[str, ReadStats]:
    """Stream `paths` (plain, .gz or .zst JSONL, in the order given) into the report's HTML."""
    stats = ReadStats()
    agg = Aggregator(max_buckets=max_buckets)
    bar = Progress(sum(p.stat().st_size for p in paths), enabled=progress)
    for record in iter_records(paths, stats, bar):
        agg.add(record)
    return render(agg, stats, [p.name for p in paths]), stats


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="kvgate report", description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", type=Path,
                        help="access logs: plain, gzip or zstd JSONL (rotated files too), read in the order given")
    parser.add_argument("-o", "--output", type=Path, default=Path("report.html"))
    parser.add_argument("--buckets", type=int, default=600, help="at most this many time buckets (default 600)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(list(argv))
    missing = [str(p) for p in args.logs if not p.is_file()]
    if missing:
        print(f"kvgate report: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    html, stats = build_report(args.logs, progress=not args.no_progress, max_buckets=args.buckets)
    args.output.write_text(html, encoding="utf-8")
    print(f"kvgate report: {stats.records} records, {stats.malformed} malformed lines skipped -> {args.output}",
          file=sys.stderr)
    return 0
