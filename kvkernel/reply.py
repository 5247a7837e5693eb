"""Replies: a local reply (made by a filter or the gateway itself) and the response head
every reply passes through `on_response` before a byte reaches the client.

A leaf module: imports nothing else from the project but the error shape.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from kvkernel.errors import error_body


@dataclass(frozen=True, slots=True)
class LocalReply:
    """A JSON reply the gateway answers itself; `body` is serialised as JSON."""

    status: int
    body: dict[str, Any] | list[Any]
    headers: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None  # for the access log; set for error replies


def error_reply(status: int, message: str, *, code: str | None = None, param: str | None = None,
                headers: Mapping[str, str] | None = None) -> LocalReply:
    """An OpenAI-shaped error as a local reply."""
    return LocalReply(status, error_body(status, message, code=code, param=param), dict(headers or {}),
                      error=message)


@dataclass(slots=True)
class ResponseHead:
    """The response (upstream or local) as it is about to be sent; filters may add headers.
    Proxied heads carry a CIMultiDict, so repeated headers (Set-Cookie, Link) survive."""

    status: int
    headers: MutableMapping[str, str]
    local: bool = False  # True: the gateway answers itself, nothing came from upstream
