"""`kvgate bench cache-round` runs end to end on a small tracker (numbers are printed, not asserted)."""

from __future__ import annotations

import re

import pytest

from kvbench.cache_round import main


def test_small_cache_round_bench_submits_actions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--prefixes", "400", "--rounds", "2", "--no-write"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"(\d+) tracked prefixes, 4 instances, 2 rounds \((\d+) actions submitted\)", out)
    assert found is not None and int(found.group(1)) > 0 and int(found.group(2)) > 0
    assert "event-loop stall, later rounds, longest" in out and "written to" not in out
