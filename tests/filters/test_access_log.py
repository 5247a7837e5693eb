"""access-log: size-based rotation (plain and zstd), `reopen()` after an external rotation,
and the config's checks. The report reads the rotated files back."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import zstandard

from filters.access_log import AccessLogConfig, AccessLogFilter
from filters.base import Services
from filters.registry import build_filters, plan_filters
from gateway.config import FilterSpec
from kvkernel.context import RequestContext
from kvkernel.decode import FieldError
from kvreport.cli import build_report


async def _filter(config: dict[str, Any]) -> AccessLogFilter:
    (f,) = build_filters(plan_filters([FilterSpec("access-log", config=config)]),
                         Services(clusters=None, background=None, http=None, metrics=None))  # type: ignore[arg-type]
    assert isinstance(f, AccessLogFilter)
    await f.start()
    return f


async def _log(f: AccessLogFilter, first: int, n: int) -> None:
    for i in range(first, first + n):
        ctx = RequestContext(f"r{i}", "POST", "/v1/completions", {})  # type: ignore[arg-type]
        ctx.status = 200
        await f.on_complete(ctx)
    await asyncio.sleep(0)  # lines are written at the end of the loop iteration


def _ids(path: Path) -> list[str]:
    data = path.read_bytes()
    if path.suffix == ".zst":
        data = zstandard.ZstdDecompressor().stream_reader(data).read()
    return [json.loads(line)["request_id"] for line in data.decode().splitlines()]


@pytest.mark.parametrize("compress", ["none", "zstd"])
async def test_rotates_by_size_keeping_backups_and_every_line(tmp_path: Path, compress: str) -> None:
    path = tmp_path / "access.jsonl"
    f = await _filter({"path": str(path), "max_bytes": "4KiB", "backups": 3, "compress": compress})
    for batch in range(40):  # ~1.5 KB per flush: a flush is never split across files
        await _log(f, batch * 3, 3)
    await f.close()
    suffix = ".zst" if compress == "zstd" else ""
    rotated = [tmp_path / f"access.jsonl.{n}{suffix}" for n in (3, 2, 1)]
    assert all(p.exists() for p in rotated) and not (tmp_path / f"access.jsonl.4{suffix}").exists()
    assert path.stat().st_size <= 4096
    assert all(p.stat().st_size <= 4096 for p in rotated)
    kept = [i for p in [*rotated, path] for i in _ids(p)]
    # the newest lines, in order, none lost
    assert kept == [f"r{i}" for i in range(120 - len(kept), 120)] and len(kept) >= 16
    assert not list(tmp_path.glob("*.part"))  # noqa: ASYNC240 - a test, after close
    html, stats = build_report([*rotated, path])
    assert stats.records == len(kept) and stats.malformed == 0


async def test_reopen_follows_an_external_rotation(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    f = await _filter({"path": str(path)})
    await _log(f, 0, 3)
    path.rename(tmp_path / "access.jsonl.old")  # logrotate's move
    await _log(f, 3, 2)  # still written to the moved file
    f.reopen()
    await _log(f, 5, 2)
    await f.close()
    assert _ids(tmp_path / "access.jsonl.old") == ["r0", "r1", "r2", "r3", "r4"]
    assert _ids(path) == ["r5", "r6"]


def test_config_checks() -> None:
    with pytest.raises(FieldError, match="stdout cannot be rotated"):
        AccessLogConfig(path="-", max_bytes=1024)
    with pytest.raises(FieldError, match="must be >= 1"):
        AccessLogConfig(path="a.jsonl", backups=0)
