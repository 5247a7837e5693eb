"""Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`.

One vocabulary for every kvgate program (the gateway, the MLX daemon, the simulated
vLLM): `type` follows the HTTP status, with the names of OpenAI's documented error
classes; `code` says precisely what happened (`model_not_found`, `route_not_found`,
`upstream_timeout`, `rate_limit_exceeded`, ...), or is null.

| status | type |
|---|---|
| 400, 409, 413, 422 (and any other 4xx not below) | `invalid_request_error` |
| 401 | `authentication_error` |
| 403 | `permission_error` |
| 404 | `not_found_error` |
| 429 | `rate_limit_error` |
| 5xx (500, 502, 503, 504, ...) | `server_error` |

Errors a backend sends are relayed as they are (vLLM's own say `BadRequestError` and
a numeric `code`). A leaf module: imports nothing else from the project.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    """The OpenAI error `type` for an HTTP status (see the module docstring)."""
    found = ERROR_TYPES.get(status)
    if found is not None:
        return found
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None,
               type_: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_ or error_type(status), "param": param, "code": code}}


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None,
                   type_: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON error response in the OpenAI shape."""
    body = json.dumps(error_body(status, message, code=code, param=param, type_=type_))
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)
