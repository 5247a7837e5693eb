"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`.

A leaf module: imports nothing else from the project.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None,
               type_: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_ or _TYPES.get(status, "error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None,
                   type_: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON error response in the OpenAI shape."""
    body = json.dumps(error_body(status, message, code=code, param=param, type_=type_))
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)
