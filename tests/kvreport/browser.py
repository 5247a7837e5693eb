"""Headless Chromium (Debian's `chromium`) for page checks: DOM after load, console errors, screenshot."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0"]


@dataclass
class PageCheck:
    dom: str
    console_errors: list[str]

    def body_attr(self, name: str) -> str | None:
        body = re.search(r"<body([^>]*)>", self.dom)
        found = re.search(rf'{name}="([^"]*)"', body.group(1)) if body else None
        return found.group(1) if found else None


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(url: str, extra: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    binary = chromium()
    assert binary, "chromium is not installed (apt-get install -y chromium)"
    with tempfile.TemporaryDirectory(prefix="kvgate-chromium-") as profile:
        return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *extra, url],
                              capture_output=True, text=True, timeout=timeout, check=False)


def check_page(url: str) -> PageCheck:
    """The page's DOM after load and the JavaScript errors Chromium logged."""
    done = _run(url, ["--dump-dom"])
    errors = [line for line in done.stderr.splitlines()
              if "CONSOLE" in line and ("Uncaught" in line or ":ERROR:" in line or "Error" in line)]
    return PageCheck(done.stdout, errors)


def screenshot(url: str, out: Path, size: str = "1200,2600") -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    _run(url, [f"--screenshot={out}", f"--window-size={size}", "--hide-scrollbars"])
    assert out.exists() and out.stat().st_size > 10_000, f"no screenshot at {out}"
