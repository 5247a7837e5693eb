"""`GET /dashboard`: a live HTML page drawn from the requests the gateway just answered."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp

from gateway.recent import RecentRequests
from kvreport.html import CHARTS
from testbed.fake_openai import FakeBackend
from tests.gateway.harness import gateway_yaml, start_backend, start_gateway


async def test_dashboard_counts_the_requests_and_draws_every_chart(tmp_path: Path) -> None:
    fakes = {eid: FakeBackend(eid, cached_tokens=8) for eid in ("a", "b")}
    servers = {eid: await start_backend(f) for eid, f in fakes.items()}
    gw = await start_gateway(gateway_yaml({e: s.port for e, s in servers.items()}, tmp_path / "access.jsonl"))
    try:
        url = f"http://127.0.0.1:{gw.port}"
        async with aiohttp.ClientSession() as session:
            for i in range(7):
                async with session.post(url + "/v1/completions", json={"model": "m", "prompt": f"hi {i}"}) as r:
                    assert r.status == 200
            async with session.get(url + "/dashboard") as resp:
                assert resp.status == 200 and resp.content_type == "text/html"
                html = await resp.text()
    finally:
        await gw.close()
        for server in servers.values():
            await server.close()
    assert "7 requests since start" in html
    assert set(re.findall(r'data-chart="([^"]+)"', html)) == set(CHARTS)
    assert "http://" not in html and "https://" not in html  # self-contained
    assert re.search(r"<td>a</td><td>yes</td>", html)


def test_the_ring_keeps_only_the_last_requests() -> None:
    from kvkernel.context import RequestContext

    ring = RecentRequests(size=3)
    for i in range(5):
        ctx = RequestContext(f"r{i}", "POST", "/v1/completions", {})  # type: ignore[arg-type]
        ctx.status = 200 + i
        ring.add(ctx)
    assert ring.total == 5 and [r["status"] for r in ring.records()] == [202, 203, 204]
