"""Benchmark-ish: a 1M-line zstd log becomes a report in bounded memory.

Prints the time and peak RSS of the report process (measured by itself with
`resource.getrusage`); asserts only a generous memory bound, never a time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import zstandard

from tests.kvreport.synth import lines

N = 1_000_000
_MEASURE = """
import json, resource, sys, time
from pathlib import Path
from kvreport.cli import build_report
t0 = time.perf_counter()
html, stats = build_report([Path(sys.argv[1])], progress=True)
Path(sys.argv[2]).write_text(html)
print(json.dumps({"seconds": time.perf_counter() - t0, "records": stats.records,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def test_a_million_lines_in_bounded_memory(tmp_path: Path) -> None:
    log = tmp_path / "access.jsonl.zst"
    with open(log, "wb") as raw, zstandard.ZstdCompressor(level=1).stream_writer(raw) as out:
        for line in lines(N):
            out.write(line.encode())
    out_html = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(log), str(out_html)], capture_output=True,
                          text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nkvgate report, {N:,} lines ({log.stat().st_size / 2**20:.1f} MiB zstd): "
          f"{numbers['seconds']:.1f} s, peak RSS {numbers['peak_rss_mib']:.0f} MiB")
    assert numbers["records"] == N
    assert "100%" in done.stderr  # the progress bar reached the end
    assert numbers["peak_rss_mib"] < 500
    assert out_html.stat().st_size < 2_000_000
