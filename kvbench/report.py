"""Write one benchmark's results into its own section of a markdown file.

The file is where the user asks: `kvgate bench -o FILE ...` (or a benchmark's own
`--output`), else `$KVGATE_BENCH_OUTPUT`, else `benchmarks.md` in the working
directory (never inside the installed package). Each benchmark owns the text between
`<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->`; other sections are left as
they are. The repository's docs/benchmarks.md is written with
`kvgate bench -o docs/benchmarks.md NAME`.
"""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

import psutil

OUTPUT_ENV = "KVGATE_BENCH_OUTPUT"


def default_path() -> Path:
    """`$KVGATE_BENCH_OUTPUT`, else ./benchmarks.md (relative: resolved when written)."""
    return Path(os.environ.get(OUTPUT_ENV) or "benchmarks.md")


HEADER = "# Benchmarks\n\nWritten by `kvgate bench ...`; each section is replaced by its own benchmark's latest run.\n"


def machine_line() -> str:
    return (
        f"{platform.machine()}, {psutil.cpu_count(logical=True)} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}"
    )


def write_section(name: str, body: str, path: Path | None = None) -> Path:
    """Replace (or append) the section `name` with `body`, stamped with date and machine."""
    stamp = f"_Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine_line()}._\n\n"
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{stamp}{body.rstrip()}\n{end}"
    path = path if path is not None else default_path()
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
