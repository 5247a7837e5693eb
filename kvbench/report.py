"""Write one benchmark's results into its own section of docs/benchmarks.md.

Each benchmark owns the text between `<!-- bench:NAME:start -->` and
`<!-- bench:NAME:end -->`; other sections are left as they are.
"""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path

import psutil

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nWritten by `kvgate bench ...`; each section is replaced by its own benchmark's latest run.\n"


def machine_line() -> str:
    return (
        f"{platform.machine()}, {psutil.cpu_count(logical=True)} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}"
    )


def write_section(name: str, body: str, path: Path = DEFAULT_PATH) -> Path:
    """Replace (or append) the section `name` with `body`, stamped with date and machine."""
    stamp = f"_Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine_line()}._\n\n"
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{stamp}{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
