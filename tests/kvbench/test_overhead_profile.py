"""Grouping py-spy samples of the gateway into components (no py-spy needed)."""

from __future__ import annotations

import pytest

from kvbench import overhead
from kvbench.overhead_profile import Breakdown, component, group, render_breakdown

RAW = [
    "<module> (gateway/__main__.py:5);Runner.run (asyncio/runners.py:118) 40",
    "Proxy._relay (gateway/proxy.py:230);StreamWriter._writelines (aiohttp/http_writer.py:116) 30",
    "Proxy._attempt (gateway/proxy.py:172);ClientSession._request (aiohttp/client.py:819) 20",
    "AccessLogFilter.on_complete (filters/access_log.py:118);JSONEncoder.encode (json/encoder.py:203) 6",
    "proxy_handler (gateway/handlers.py:40);_observe (gateway/handlers.py:55) 3",
    "something (mystery.py:1) 1",
    "not a sample line",
]


def test_leaf_frames_map_to_components() -> None:
    assert component("Runner.run (asyncio/runners.py:118)").startswith("event loop")
    assert component("StreamWriter._write (aiohttp/http_writer.py:104)").startswith("socket writes")
    assert component("RequestHandler.start (aiohttp/web_protocol.py:686)").startswith("aiohttp server")
    assert component("MutexValue.inc (prometheus_client/values.py:20)") == "Prometheus metrics"
    assert component("x (elsewhere.py:1)") == "other"


def test_samples_are_counted_by_leaf_and_sorted() -> None:
    samples, shares = group(RAW)
    assert samples == 100
    assert list(shares)[:3] == ["event loop, socket reads, C parsers (uvloop)",
                                "socket writes + HTTP serialising (aiohttp)", "aiohttp client (upstream request)"]
    assert shares["JSON (body parse, prompt digest, access-log line)"] == pytest.approx(0.06)
    assert shares["gateway (handler, proxy, headers)"] == pytest.approx(0.03)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert group([]) == (0, {})


def test_breakdown_table_converts_shares_to_microseconds() -> None:
    text = render_breakdown(Breakdown(100, {"aiohttp client (upstream request)": 0.25}, 400.0), 4000, 32)
    assert "| aiohttp client (upstream request) | 25% | 100 |" in text
    assert "100 samples, non-streaming c=32, 4000 requests" in text


def test_py_spy_flag_needs_py_spy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(overhead, "find_py_spy", lambda: None)
    with pytest.raises(SystemExit):
        overhead.parse_args(["--py-spy"])
    monkeypatch.setattr(overhead, "find_py_spy", lambda: "/usr/bin/py-spy")
    assert overhead.parse_args(["--py-spy"]).py_spy
    with pytest.raises(SystemExit):
        overhead.parse_args(["--py-spy", "--workers", "2"])
