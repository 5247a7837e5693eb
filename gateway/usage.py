"""Token accounting for streams whose client did not ask for usage.

The gateway always wants prompt, cached and completion tokens. A streamed completion
reports them only when the request says `stream_options.include_usage`; when the
client did not, the exchange adds it upstream (`ask_for_usage`, the body is then
re-serialised) and the relay passes the response through a `UsageChunkStripper`,
which drops the extra usage-only chunk (`"choices": []` with a `usage`) so the client
receives the bytes it would have received without the gateway. The proxy still parses
the usage from the upstream's bytes.

Events are forwarded whole: bytes after the last event boundary wait for the next read
(an SSE event split across reads is held for that long, nothing else is).
"""

from __future__ import annotations

import json
import re
from typing import Any

from kvkernel.context import RequestContext, StateKey

USAGE_ADDED: StateKey[bool] = StateKey("usage_added", bool)
_EVENT = re.compile(rb".*?(?:\r\n\r\n|\n\n|\r\r)", re.S)
_USAGE_NULL = b',"usage":null'


def ask_for_usage(ctx: RequestContext) -> bool:
    """Add `stream_options.include_usage: true` to a streamed completion that lacks it;
    True when the body changed (the caller re-serialises it)."""
    body = ctx.json
    if ctx.method != "POST" or body is None or body.get("stream") is not True:
        return False
    if not ctx.path.endswith("/completions"):
        return False
    options = body.get("stream_options")
    if options is None:
        options = {}
    elif not isinstance(options, dict) or options.get("include_usage") is True \
            or options.get("continuous_usage_stats"):
        return False  # invalid (the backend says so), already asked, or usage on every chunk
    body["stream_options"] = {**options, "include_usage": True}
    ctx[USAGE_ADDED] = True
    return True


def _data(event: bytes) -> Any:
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    try:
        return json.loads(b"\n".join(lines)) if lines else None
    except ValueError:
        return None


def _clean(event: bytes) -> bytes:
    """The event as the client would have had it: b"" for the usage-only chunk."""
    if b'"usage"' not in event:
        return event
    data = _data(event)
    if not isinstance(data, dict) or "usage" not in data:
        return event
    if data["usage"] is None:  # OpenAI marks every chunk `"usage":null` once usage is asked for
        return event.replace(_USAGE_NULL, b"", 1)
    if data.get("choices") == []:
        return b""
    return event


_SEPARATORS = (b"\n\n", b"\r\n\r\n", b"\r\r")


def _boundary(data: bytes) -> int:
    """The end of the last complete event in `data` (0 if none)."""
    if data.endswith(_SEPARATORS):  # the usual read: whole events
        return len(data)
    return max((data.rfind(sep) + len(sep) for sep in _SEPARATORS if sep in data), default=0)


def _events(data: bytes) -> list[bytes]:
    """Whole events, each with its blank line. Without a `\r` only `\n\n` ends an event:
    a split, not the regex's scan of every byte (the same events)."""
    if b"\r" in data:
        return [match.group() for match in _EVENT.finditer(data)]
    return [part + b"\n\n" for part in data.split(b"\n\n")[:-1]]


class UsageChunkStripper:
    """Feed upstream bytes, write what `feed` returns, then what `flush` returns."""

    __slots__ = ("pending", "stripped")

    def __init__(self) -> None:
        self.pending = b""
        self.stripped = 0  # usage-only chunks dropped

    def feed(self, chunk: bytes) -> bytes:
        data = self.pending + chunk if self.pending else chunk
        cut = _boundary(data)
        if cut == len(data):  # no partial event to hold back: no copies
            complete, self.pending = data, b""
        else:
            complete, self.pending = data[:cut], data[cut:]
        if b'"usage"' not in complete:
            return complete
        out = []
        for event in _events(complete):
            cleaned = _clean(event)
            self.stripped += not cleaned
            out.append(cleaned)
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self.pending = self.pending, b""
        return _clean(rest) if rest else rest


def stripper_for(ctx: RequestContext, status: int, content_type: str, content_length: int | None
                 ) -> UsageChunkStripper | None:
    """A stripper when the gateway added `include_usage` and this is the event stream."""
    if not ctx.get(USAGE_ADDED) or status != 200 or content_length is not None:
        return None
    return UsageChunkStripper() if content_type.startswith("text/event-stream") else None
