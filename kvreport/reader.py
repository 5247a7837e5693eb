"""Read JSONL access logs (plain, gzip, zstd) line by line, counting malformed lines.

Memory is bounded by one line: files are streamed, never read whole.
"""

from __future__ import annotations

import gzip
import io
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


@dataclass
class ReadStats:
    lines: int = 0
    records: int = 0
    malformed: int = 0
    blank: int = 0


def open_text(path: Path) -> tuple[IO[str], IO[bytes]]:
    """The decoded text stream of `path` and its raw file (whose position drives progress).
    The compression is sniffed from the magic bytes, so rotated files without a suffix work."""
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller
    magic = raw.read(4)
    raw.seek(0)
    binary: Any
    if magic[:2] == b"\x1f\x8b":
        binary = gzip.GzipFile(fileobj=raw)
    elif magic == b"\x28\xb5\x2f\xfd":
        import zstandard

        binary = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    else:
        binary = raw
    return io.TextIOWrapper(io.BufferedReader(binary), encoding="utf-8", errors="replace"), raw


class Progress:
    """A one-line progress bar on stderr, by bytes of (compressed) input read."""

    def __init__(self, total_bytes: int, enabled: bool = True, stream: IO[str] = sys.stderr) -> None:
        self.total = max(total_bytes, 1)
        self.enabled = enabled
        self.stream = stream
        self._done_before = 0
        self._last = 0.0

    def update(self, position: int, lines: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < 0.2):
            return
        self._last = now
        frac = min((self._done_before + position) / self.total, 1.0)
        bar = "#" * int(frac * 30)
        self.stream.write(f"\rkvgate report [{bar:<30}] {frac:4.0%} {lines:,} lines")
        self.stream.flush()

    def next_file(self, size: int) -> None:
        self._done_before += size

    def finish(self, lines: int) -> None:
        if self.enabled:
            self.update(0, lines, force=True)
            self.stream.write("\n")
            self.stream.flush()


def iter_records(paths: Sequence[Path], stats: ReadStats, progress: Progress | None = None) -> Iterator[dict[str, Any]]:
    """Every JSON object line of `paths`, in order; other lines are counted in `stats.malformed`."""
    for path in paths:
        text, raw = open_text(path)
        size = path.stat().st_size
        with text, raw:
            for line in text:
                stats.lines += 1
                if not line.strip():
                    stats.blank += 1
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    stats.malformed += 1
                    continue
                if not isinstance(record, dict):
                    stats.malformed += 1
                    continue
                stats.records += 1
                if progress is not None and stats.lines % 4096 == 0:
                    progress.update(raw.tell(), stats.lines)
                yield record
        if progress is not None:
            progress.next_file(size)
    if progress is not None:
        progress.finish(stats.lines)
