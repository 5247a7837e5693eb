"""`kvgate bench overhead` end to end with tiny counts: real backend, gateway and load
generator processes on 127.0.0.1. Checks the report's structure and sanity, never timings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kvbench import overhead
from kvbench.overhead import Options, run_benchmark
from kvbench.overhead_report import Scenario, TargetStats, goals, percentile, render
from kvbench.report import write_section

TINY = Options(requests=120, serial_requests=15, rounds=2, concurrency=8, warmup=10, output=None)


@pytest.fixture(scope="module")
def bench() -> tuple[list[Scenario], dict[str, TargetStats], overhead.RunInfo]:
    return run_benchmark(TINY)


def test_every_request_is_answered_on_every_path(bench: tuple) -> None:
    plan, stats, _ = bench
    assert [(s.name, s.concurrency) for s in plan] == [
        ("non-streaming", 8), ("streaming", 8), ("non-streaming", 1), ("streaming", 1)]
    for s in plan:
        assert list(s.targets) == ["direct", "gateway", "gateway-full", "bare-relay"]
        for target in s.targets:
            assert len(s.results[target]) == TINY.rounds
            x = stats[f"{s.key}/{target}"]
            assert (x.requests, x.errors) == (s.count * TINY.rounds, 0), f"{s.key}/{target}"


def test_figures_are_positive_and_consistent(bench: tuple) -> None:
    plan, stats, _ = bench
    for key, x in stats.items():
        assert x.rps > 0 and 0 < x.p50_ms <= x.p99_ms, key
        assert 0 < x.ttfb_p50_ms <= x.p99_ms, key
    for s in plan:
        for result in s.results["gateway"] + s.results["bare-relay"]:
            assert all(0 < t <= lat for t, lat in zip(result.ttfb_ms, result.latency_ms, strict=True))
    # The gateway's CPU is measured from its process: a busy round cannot cost nothing.
    assert stats[f"non-streaming@c{TINY.concurrency}/gateway"].cpu_us_per_request > 0


def test_the_gateway_really_ran_the_chain(bench: tuple) -> None:
    plan, _, info = bench
    warmups = sum(min(TINY.warmup, s.count) for s in plan)
    measured = sum(s.count for s in plan) * TINY.rounds
    assert info.access_log_lines == {"gateway": warmups + measured, "gateway-full": warmups + measured}


def test_report_names_every_path_and_target(bench: tuple, tmp_path: Path) -> None:
    plan, stats, info = bench
    text = render(plan, stats, info)
    for s in plan:
        for target in s.targets:
            assert f"| {s.name} c={s.concurrency} | {target} |" in text
    assert "Against the bare aiohttp relay: CPU" in text
    assert "| gateway-full |" in text and "/ bare-relay" in text  # the same-run CPU ratios
    rows = [g.row() for g in goals(stats, TINY.concurrency)]
    assert len(rows) == 4 and all(row in text for row in rows)
    assert all(" met |" in row or "missed by" in row for row in rows)
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- bench:mlx:start -->\nmlx figures\n<!-- bench:mlx:end -->\n")
    write_section("overhead", text, doc)
    write_section("overhead", text, doc)  # a rerun replaces its own section only
    written = doc.read_text()
    assert written.count("<!-- bench:overhead:start -->") == 1 and "mlx figures" in written
    assert "### Gateway overhead" in written


def test_goal_arithmetic() -> None:
    def stat(rps: float, p50: float, ttfb: float, cpu: float) -> TargetStats:
        return TargetStats(10, 0, rps, p50, p50, ttfb, cpu)

    stats = {"non-streaming@c32/direct": stat(1000, 1, 1, 50), "non-streaming@c32/gateway": stat(500, 2, 2, 120),
             "non-streaming@c1/direct": stat(1, 0.2, 0.2, 50), "non-streaming@c1/gateway": stat(1, 0.6, 0.6, 300),
             "streaming@c1/direct": stat(1, 0.3, 0.1, 50), "streaming@c1/gateway": stat(1, 0.5, 0.4, 300)}
    result = {g.label.split(",")[0]: (round(g.value, 6), g.met) for g in goals(stats, 32)}
    assert result == {"throughput gateway/direct": (0.5, True), "added p50 latency": (0.4, False),
                      "added streaming TTFB p50": (0.3, True), "gateway CPU per request": (120, True)}
    assert percentile([5, 1, 3, 2, 4], 50) == 3 and percentile([1, 2], 99) == 2
    assert math.isnan(percentile([], 50))


@pytest.mark.parametrize("argv", [["--requests", "0"], ["--rounds", "0"], ["--workers", "0"],
                                  ["--baseline-tree", "/nonexistent"]])
def test_bad_options_are_rejected(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        overhead.parse_args(argv)
    assert exc.value.code == 2


def test_cli_runs_and_writes_its_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "benchmarks.md"
    argv = ["--requests", "40", "--serial-requests", "5", "--rounds", "1", "--concurrency", "4",
            "--warmup", "5", "--no-bare-relay", "--output", str(doc)]
    assert overhead.main(argv) == 0
    out = capsys.readouterr().out
    assert "| target (issue #2) |" in out and f"written to {doc}" in out
    assert "| non-streaming c=4 | gateway |" in doc.read_text() and "bare-relay" not in doc.read_text()
