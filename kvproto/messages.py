"""LMCache controller wire messages (checked against lmcache 0.5.6 `cache_controller/message.py`).

On the wire a message is a map tagged by `"type"` (the class name), encoded with
msgpack; a frame that starts with `{` is JSON instead (the controller accepts
both; replies are always msgpack). Messages are plain dicts here: `make()` builds
one with defaults filled and fields checked, `encode()`/`decode()` convert
frames, and `decode()` rejects unknown types, missing fields and wrong types
with `ProtocolError` — as msgspec does in the real controller.

Sockets: RegisterMsg (and FullSyncStart/Status) go worker->controller on the
"reply" ROUTER; HeartbeatMsg on the "heartbeat" ROUTER; BatchedKVOperationMsg and
DeRegisterMsg on the "pull" PULL. The controller sends `*WorkerMsg` control
messages to each worker's REP socket and expects the matching `*WorkerRetMsg`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import msgpack

OP_ADMIT = "admit"
OP_EVICT = "evict"


class ProtocolError(ValueError):
    """A frame that is not a valid LMCache controller message."""


_REQUIRED = object()  # sentinel: the field has no default


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_ints(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v)


def _is_op(v: Any) -> bool:
    return (
        isinstance(v, Mapping)
        and v.get("op_type") in (OP_ADMIT, OP_EVICT)
        and _is_int(v.get("key"))
        and _is_int(v.get("seq_num"))
    )


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


_CHECKS: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "int": _is_int,
    "ints": _is_ints,
    "opt_str": _opt(lambda v: isinstance(v, str)),
    "opt_ints": _opt(_is_ints),
    "opt_bool": _opt(lambda v: isinstance(v, bool)),
    "ops": lambda v: isinstance(v, list) and all(_is_op(x) for x in v),
    "str_map": lambda v: isinstance(v, Mapping) and all(isinstance(x, str) for x in v.values()),
    "list": lambda v: isinstance(v, list),
    "bool": lambda v: isinstance(v, bool),
}

_WORKER_ID = {"instance_id": ("str", _REQUIRED), "worker_id": ("int", _REQUIRED)}
_ENDPOINT = {**_WORKER_ID, "ip": ("str", _REQUIRED), "port": ("int", _REQUIRED)}
_PEER = {"peer_init_url": ("opt_str", _REQUIRED)}
_EVENT = {"worker_event_id": ("str", _REQUIRED)}
_NUM = {"num_tokens": ("int", _REQUIRED)}
_COMPRESS = {
    **_EVENT,
    "method": ("str", _REQUIRED),
    "location": ("str", _REQUIRED),
    "tokens": ("opt_ints", None),
}

# type -> {field: (check, default or _REQUIRED)}
SCHEMAS: dict[str, dict[str, tuple[str, Any]]] = {
    "RegisterMsg": {**_ENDPOINT, **_PEER},
    "RegisterRetMsg": {"extra_config": ("str_map", {})},
    "HeartbeatMsg": {**_ENDPOINT, **_PEER},
    "HeartbeatRetMsg": {"commands": ("list", [])},
    "DeRegisterMsg": dict(_ENDPOINT),
    "BatchedKVOperationMsg": {
        **_WORKER_ID,
        "location": ("str", _REQUIRED),
        "operations": ("ops", _REQUIRED),
    },
    "FullSyncStartMsg": {
        **_WORKER_ID,
        "location": ("str", _REQUIRED),
        "sync_id": ("str", _REQUIRED),
        "total_keys": ("int", _REQUIRED),
        "batch_count": ("int", _REQUIRED),
    },
    "FullSyncStartRetMsg": {
        "sync_id": ("str", _REQUIRED),
        "accepted": ("bool", _REQUIRED),
        "error_msg": ("opt_str", None),
    },
    "PinWorkerMsg": {**_EVENT, "location": ("str", _REQUIRED), "tokens": ("ints", _REQUIRED)},
    "ClearWorkerMsg": {**_EVENT, "location": ("str", _REQUIRED)},
    "CompressWorkerMsg": dict(_COMPRESS),
    "DecompressWorkerMsg": dict(_COMPRESS),
    "HealthWorkerMsg": dict(_EVENT),
    "MoveWorkerMsg": {
        **_EVENT,
        "old_position": ("str", _REQUIRED),
        "new_position": ("list", _REQUIRED),
        "tokens": ("opt_ints", None),
        "copy": ("opt_bool", True),
    },
    "PinWorkerRetMsg": dict(_NUM),
    "ClearWorkerRetMsg": dict(_NUM),
    "CompressWorkerRetMsg": dict(_NUM),
    "DecompressWorkerRetMsg": dict(_NUM),
    "MoveWorkerRetMsg": dict(_NUM),
    "HealthWorkerRetMsg": {"error_code": ("int", _REQUIRED)},
    "ErrorMsg": {"error": ("str", _REQUIRED)},
}

# control message type -> its reply type
CONTROL_REPLIES: dict[str, str] = {
    "PinWorkerMsg": "PinWorkerRetMsg",
    "ClearWorkerMsg": "ClearWorkerRetMsg",
    "CompressWorkerMsg": "CompressWorkerRetMsg",
    "DecompressWorkerMsg": "DecompressWorkerRetMsg",
    "HealthWorkerMsg": "HealthWorkerRetMsg",
    "MoveWorkerMsg": "MoveWorkerRetMsg",
}


def validate(msg: Mapping[str, Any]) -> dict[str, Any]:
    """Check `msg` against its schema; return a copy with defaults filled.

    Unknown extra fields are dropped (msgspec ignores them too).
    """
    type_ = msg.get("type")
    schema = SCHEMAS.get(type_) if isinstance(type_, str) else None
    if schema is None:
        raise ProtocolError(f"unknown message type {type_!r}")
    out: dict[str, Any] = {"type": type_}
    for name, (check, default) in schema.items():
        if name not in msg:
            if default is _REQUIRED:
                raise ProtocolError(f"{type_}: missing field {name!r}")
            out[name] = default.copy() if isinstance(default, dict | list) else default
            continue
        value = msg[name]
        if not _CHECKS[check](value):
            raise ProtocolError(f"{type_}.{name}: expected {check}, got {value!r:.80}")
        out[name] = value
    return out


def make(type_: str, **fields: Any) -> dict[str, Any]:
    """Build a checked message of `type_` from keyword fields."""
    return validate({"type": type_, **fields})


def encode(msg: Mapping[str, Any]) -> bytes:
    """msgpack frame of a message (checked; `"type"` first, as msgspec writes it)."""
    frame: bytes = msgpack.packb(validate(msg), use_bin_type=True)
    return frame


def encode_json(msg: Mapping[str, Any]) -> bytes:
    """JSON frame of a message (what external systems such as Mooncake send)."""
    return json.dumps(validate(msg), separators=(",", ":")).encode()


def decode(frame: bytes) -> dict[str, Any]:
    """Parse a msgpack frame, or a JSON frame if it starts with `{`; raise ProtocolError."""
    try:
        raw = json.loads(frame) if frame[:1] == b"{" else msgpack.unpackb(frame, raw=False)
    except (ValueError, msgpack.UnpackException, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"undecodable frame: {exc}") from exc
    if not isinstance(raw, dict):
        raise ProtocolError(f"frame is not a map but {type(raw).__name__}")
    return validate(raw)


def kv_ops(op_type: str, keys: list[int], first_seq: int) -> list[dict[str, Any]]:
    """`KVOpEvent` maps for `keys`, numbered from `first_seq` (per-location sequence)."""
    return [
        {"op_type": op_type, "key": key, "seq_num": first_seq + i} for i, key in enumerate(keys)
    ]
