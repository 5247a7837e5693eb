"""What a backend implements to answer the LMCache controller's control messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from kvproto.messages import make


class ControlHandler(Protocol):
    """What a backend implements so the controller can act on its cache."""

    async def pin(self, tokens: list[int], location: str) -> int: ...
    async def clear(self, location: str) -> int: ...
    async def compress(self, tokens: list[int] | None, method: str, location: str) -> int: ...
    async def decompress(self, tokens: list[int] | None, method: str, location: str) -> int: ...
    async def health(self) -> int: ...


async def dispatch_control(handler: ControlHandler, msg: Mapping[str, Any]) -> dict[str, Any]:
    """Run one control message against `handler`; return the matching reply message."""
    kind = msg["type"]
    if kind == "PinWorkerMsg":
        return make("PinWorkerRetMsg", num_tokens=await handler.pin(msg["tokens"], msg["location"]))
    if kind == "ClearWorkerMsg":
        return make("ClearWorkerRetMsg", num_tokens=await handler.clear(msg["location"]))
    if kind == "CompressWorkerMsg":
        n = await handler.compress(msg["tokens"], msg["method"], msg["location"])
        return make("CompressWorkerRetMsg", num_tokens=n)
    if kind == "DecompressWorkerMsg":
        n = await handler.decompress(msg["tokens"], msg["method"], msg["location"])
        return make("DecompressWorkerRetMsg", num_tokens=n)
    if kind == "HealthWorkerMsg":
        return make("HealthWorkerRetMsg", error_code=await handler.health())
    return make("ErrorMsg", error=f"unsupported control message {kind}")
