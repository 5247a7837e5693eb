"""The report (from a real `kvgate demo` stack's access log) and the live /dashboard open in
headless Chromium without JavaScript errors and with every chart drawn; the run saves the
report's screenshot (KVGATE_UPDATE_SCREENSHOT=1 refreshes docs/img/report.png, shown in the README)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from kvreport.html import CHARTS
from testbed.fake_openai import FakeBackend
from tests.gateway.harness import gateway_yaml, start_backend, start_gateway
from tests.kvreport.browser import check_page, chromium, screenshot
from tests.kvreport.test_report import embedded_totals, expected_totals

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(chromium() is None and not os.environ.get("KVGATE_REQUIRE_CHROMIUM"),
                                 reason="chromium not installed (.ci/run installs it)")]


@pytest.fixture(scope="module")
def demo_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("demo")
    done = subprocess.run([sys.executable, "-m", "gateway", "demo", "--users", "9", "--keep", str(work)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work / "logs" / "access.jsonl"


def test_report_of_the_demo_stack_opens_without_errors_and_totals_match(demo_log: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    subprocess.run([sys.executable, "-m", "gateway", "report", str(demo_log), "-o", str(out)],
                   check=True, cwd=ROOT, capture_output=True)
    records = [json.loads(line) for line in demo_log.read_text().splitlines() if line.strip()]
    got, want = embedded_totals(out.read_text()), expected_totals(records)
    assert {k: got[k] for k in want} == want
    assert want["tokens"]["prompt_tokens"] > 0 and want["tokens"]["cached_tokens"] > 0  # real fields, not nulls

    page = check_page(out.as_uri())
    assert page.console_errors == [] and page.body_attr("data-errors") is None
    assert page.body_attr("data-charts") == str(len(CHARTS))
    # The run saves its screenshot; KVGATE_UPDATE_SCREENSHOT=1 also refreshes the README's copy.
    shot = tmp_path / "report.png"
    screenshot(out.as_uri(), shot)
    assert shot.stat().st_size > 10_000  # a rendered page, not an empty image
    if os.environ.get("KVGATE_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, ROOT / "docs" / "img" / "report.png")


async def test_live_dashboard_opens_without_errors(tmp_path: Path) -> None:
    fakes = {eid: FakeBackend(eid, cached_tokens=16) for eid in ("a", "b")}
    servers = {eid: await start_backend(f) for eid, f in fakes.items()}
    gw = await start_gateway(gateway_yaml({e: s.port for e, s in servers.items()}, tmp_path / "access.jsonl"))
    try:
        url = f"http://127.0.0.1:{gw.port}"
        async with aiohttp.ClientSession() as session:
            for i in range(6):
                async with session.post(url + "/v1/completions", json={"model": "m", "prompt": f"p{i}"}) as r:
                    assert r.status == 200
        page = await asyncio.to_thread(check_page, url + "/dashboard")
        await asyncio.to_thread(screenshot, url + "/dashboard", tmp_path / "dashboard.png")
    finally:
        await gw.close()
        for server in servers.values():
            await server.close()
    assert page.console_errors == [] and page.body_attr("data-errors") is None
    assert page.body_attr("data-charts") == str(len(CHARTS))
    assert "6 requests since start" in page.dom
