"""Input hygiene: one normalised request target for routes, filters and the upstream,
and one log line (no traceback) for a client's malformed request.

Rejected with a 400 (`invalid_request_target`), since backends and the gateway could
read them differently (a route or a filter skipped, a path escaped):
- anything but origin-form (`/path?query`): absolute-form `http://host/path`,
  authority-form, `*`;
- dot segments (`/v1/../x`, `/v1/./x`), empty segments (`//`), backslashes;
- encoded dots, slashes and backslashes (`%2e`, `%2f`, `%5c`), encoded or raw
  control characters (`%00`..`%1f`, `%7f`);
- `;` path parameters (`/v1/completions;x=1`).

Normalised: a trailing slash is dropped (`/v1/completions/` is `/v1/completions`),
so routes, filters and the upstream see the same path. The query string is kept.
"""

from __future__ import annotations

import functools
import logging
import re

from aiohttp.http_exceptions import HttpProcessingError

_ENCODED_BAD = re.compile(r"%(2e|2f|5c|[01][0-9a-f]|7f)", re.IGNORECASE)
_RAW_BAD = re.compile(r"[\x00-\x20\x7f\\;]")


class TargetError(ValueError):
    """A request target the gateway refuses (the message names why)."""


@functools.lru_cache(maxsize=1024)  # a few paths make nearly all traffic: each is checked once
def normalise_target(raw: str) -> str:
    """The origin-form target with its trailing slash dropped; TargetError if refused."""
    if not raw.startswith("/"):
        raise TargetError("the request target must be a path (origin-form), not an absolute URL or '*'")
    path, sep, query = raw.partition("?")
    if _RAW_BAD.search(path):
        raise TargetError("the request path must not contain ';', '\\', spaces or control characters")
    if _ENCODED_BAD.search(path):
        raise TargetError("the request path must not contain encoded dots, slashes or control characters")
    segments = path.split("/")[1:]
    if len(segments) > 1 and segments[-1] == "":
        segments.pop()  # one trailing slash: normalised away
    if any(s in (".", "..") for s in segments) or (len(segments) > 1 and "" in segments):
        raise TargetError("the request path must not contain empty, '.' or '..' segments")
    return "/" + "/".join(segments) + sep + query


class _OneLineClientErrors(logging.Filter):
    """aiohttp logs a malformed request (a client's fault) with a traceback: one line
    is enough, and a client must not be able to flood the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            record.msg = f"{record.getMessage()}: {exc.code} {exc.message!r}"[:300]
            record.args, record.exc_info, record.exc_text = None, None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_FILTER = _OneLineClientErrors()


def quiet_client_errors() -> None:
    """Install the one-line filter on aiohttp's server logger (idempotent)."""
    logger = logging.getLogger("aiohttp.server")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
