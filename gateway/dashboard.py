"""`GET /dashboard`: a live, self-contained HTML page from in-process stats.

The charts are the offline report's (`kvreport`), drawn from the last requests the
gateway answered (`RecentRequests`), plus the endpoints' live state. The page
refreshes itself every 5 s; it loads nothing from anywhere.
"""

from __future__ import annotations

from html import escape

from aiohttp import web

from gateway.state import STATE_KEY
from kvreport.aggregate import Aggregator
from kvreport.html import dashboard_page


async def dashboard(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    recent = state.metrics.recent
    agg = Aggregator(max_buckets=120)
    for record in recent.records():
        agg.add(record)
    rows = "".join(
        f"<tr><td>{escape(str(s['id']))}</td><td>{'yes' if s.get('healthy') else 'no'}</td>"
        f"<td>{escape(str(s.get('breaker', '-')))}</td><td>{s.get('inflight', 0)}</td></tr>"
        for s in (e.snapshot() for e in state.clusters.all_endpoints()))
    live = (f"<p>{state.inflight} in flight · {recent.total} requests since start · charts over the last "
            f"{len(recent)}{' (draining)' if state.draining else ''}</p>"
            "<table><tr><th>endpoint</th><th>healthy</th><th>breaker</th><th>in flight</th></tr>"
            f"{rows}</table>")
    return web.Response(text=dashboard_page(agg, live), content_type="text/html")
