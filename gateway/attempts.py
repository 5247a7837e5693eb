"""What one failed upstream attempt means, decided purely (no I/O): the status the
client would get, whether another endpoint may be tried, whether the endpoint's
circuit breaker counts it, and what outlier detection records; then `charge` and
`judge` apply a verdict to the endpoint.

| failure | status | retried | breaker | outlier |
|---|---|---|---|---|
| connect refused / connect timeout / reset before the head | 502 / 504 | yes | yes | gateway failure |
| timeout after the request was sent, before the head | 504 | GET/HEAD only | no | gateway failure |
| answered 502 / 504 | as is | yes | yes | gateway failure |
| answered 503 | as is | yes | no (backpressure) | gateway failure |
| answered 429 | as is | yes | no (backpressure) | none |
| answered 500 (and other 5xx) | as is | yes | no | 5xx |

A status is retried only while attempts remain; on the final attempt it is relayed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import aiohttp

from gateway.endpoints import Cluster, Endpoint
from gateway.outlier import Outcome, outcome_of_status
from kvkernel.context import RequestContext
from kvkernel.errors import error_body
from kvkernel.reply import LocalReply, error_reply

log = logging.getLogger("kvgate.proxy")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
BREAKER_STATUSES = frozenset({502, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class Verdict:
    status: int
    message: str
    code: str
    retry: bool  # another endpoint may be tried
    breaker: bool  # counts as a failure against the endpoint's breaker
    outcome: Outcome
    stale: bool = False  # the connection closed before any answer: a fresh one may work


def verdict_of_error(exc: BaseException, endpoint_id: str, method: str) -> Verdict:
    """An exception raised before the response head arrived."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return Verdict(504, f"upstream {endpoint_id} failed: connect timeout", "upstream_unavailable",
                       True, True, Outcome.GATEWAY_FAILURE)
    if isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ClientConnectionError):
        # The backend accepted the request and is still working on it: running it again
        # elsewhere doubles the work, and a slow answer says nothing of the backend's health.
        return Verdict(504, f"upstream {endpoint_id} timed out before answering", "upstream_timeout",
                       method in IDEMPOTENT_METHODS, False, Outcome.GATEWAY_FAILURE)
    return Verdict(502, f"upstream {endpoint_id} failed: {type(exc).__name__}", "upstream_unavailable",
                   True, True, Outcome.GATEWAY_FAILURE, stale=isinstance(exc, aiohttp.ServerDisconnectedError))


def verdict_of_status(status: int, endpoint_id: str) -> Verdict | None:
    """A retryable answer's verdict, None for an answer to relay as is."""
    if status not in RETRY_STATUSES:
        return None
    return Verdict(status, f"upstream {endpoint_id} answered {status}", "upstream_error", True,
                   status in BREAKER_STATUSES, outcome_of_status(status))


def sse_error_event(status: int, message: str, timed_out: bool) -> bytes:
    """The last event of a stream broken after its head: `data: {"error": {...}}` in
    OpenAI's error shape (what OpenAI's own streams send on a server error)."""
    body = error_body(status, message, code="upstream_timeout" if timed_out else "upstream_broken")
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def no_endpoint_reply(cluster: Cluster) -> LocalReply:
    """503 when no endpoint could be tried: all unhealthy, ejected, breaker-open, or at
    `max_inflight_per_endpoint` (then said so: it is load, not breakage)."""
    if any(e.max_inflight is not None and e.inflight >= e.max_inflight for e in cluster.endpoints):
        return error_reply(503, f"every endpoint of cluster '{cluster.name}' is at its in-flight limit or "
                           "unavailable", code="endpoints_saturated", headers={"Retry-After": "1"})
    return error_reply(503, f"no healthy endpoint in cluster '{cluster.name}'", code="no_healthy_endpoint",
                       headers={"Retry-After": "1"})


def charge(endpoint: Endpoint, counts: bool) -> None:
    """A failed attempt: counted in the endpoint's stats, and against its breaker when
    `counts` (else only its half-open slot, if it held one, is given back)."""
    endpoint.stats.failures += 1
    if counts:
        endpoint.breaker.record_failure()
    else:
        endpoint.breaker.release()


def judge(ctx: RequestContext, cluster: Cluster, endpoint: Endpoint, outcome: Outcome) -> None:
    """Tell outlier detection; an ejection is logged and named in the access log."""
    outliers = cluster.outliers
    if outliers is not None and outliers.record(endpoint.outlier, outcome):
        ctx.log_fields["ejected_endpoint"] = endpoint.id
        log.warning("endpoint %s ejected as an outlier for %.0fs (ejection %d)", endpoint.id,
                    endpoint.outlier.remaining() or 0.0, endpoint.outlier.ejections)
