"""`kvgate bench mlx` runs end to end (tiny model, short prefix) and reports real reuse."""

from __future__ import annotations

import re

import pytest

from kvbench.mlx import main


def test_bench_mlx_prints_the_table_with_reuse(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--preset", "tiny", "--prefix-tokens", "300", "--runs", "1", "--decode-tokens", "4",
                 "--concurrency", "2", "--no-write"])
    out = capsys.readouterr().out
    assert code == 0
    cached = int(re.search(r"cached tokens on warm requests \(min\) \| (\d+)", out).group(1))
    assert cached >= 290
    for label in ("TTFT without reuse", "TTFT with prefix reuse", "prefill throughput", "decode, one stream"):
        assert label in out
