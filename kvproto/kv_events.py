"""vLLM's KV-events wire format: event dataclasses, `encode_batch`, `decode_batch`.

Checked against vLLM's `vllm/distributed/kv_events.py` (msgspec structs) and
`examples/online_serving/kv_events_subscriber.py`:

- ZMQ PUB multipart `(topic, seq, payload)`; `seq` is an unsigned 8-byte
  big-endian counter starting at 0 when the publisher starts.
- `payload` is msgpack of `KVEventBatch`, always positional: `[ts, [events]]` plus
  `data_parallel_rank` as a third element when it is set.
- Each event is tagged by its class name. Two encodings exist in the field:
  `"array"` (vLLM before PR #42892, e.g. 0.23: `["BlockStored", block_hashes,
  parent_block_hash, token_ids, block_size, lora_id, medium]`,
  `["BlockRemoved", block_hashes, medium]`, `["AllBlocksCleared"]`) and `"map"`
  (newer vLLM, e.g. 0.26+: `{"type": "BlockStored", "block_hashes": ..., ...}`
  with the same field names). `decode_batch` accepts both, in any mix;
  `encode_batch` writes either.
- Block hashes are 64-bit ints (signed or unsigned) or bytes, opaque to consumers:
  a subscriber indexes by `token_ids` and uses hashes only to match removals to
  stores. `medium` is `"GPU"` for the engine's own KV cache.

Decoding is strict about types and required fields (errors name the path, e.g.
`events[1](BlockStored).token_ids[3]: expected int, got str`) and tolerant of
what msgspec tolerates: extra trailing array elements, unknown map keys, and
trailing optional fields left out, as older vLLM wrote them (`lora_id`,
`lora_name`: None; `medium`: "GPU", the only tier before the field existed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

BlockHash = int | bytes
EventFormat = Literal["map", "array"]
EVENT_FORMATS: tuple[EventFormat, ...] = ("map", "array")
MEDIUM_GPU = "GPU"
END_SEQ = -1  # replay's end marker, sent as a signed 8-byte big-endian int


class KVEventDecodeError(ValueError):
    """A payload that is not a well-formed KVEventBatch; the message names the bad path."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Consecutive full blocks became cached; `token_ids` are the tokens of exactly these blocks.

    `parent_block_hash` is the hash of the block before the first one (None at the
    start of a sequence).
    """

    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: BlockHash | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU
    lora_name: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """These blocks left the cache (`medium` tier)."""

    block_hashes: tuple[BlockHash, ...]
    medium: str | None = MEDIUM_GPU


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Every block of the publisher's cache is gone (e.g. a prefix-cache reset)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KVEventBatch:
    """One published message: events in the order they happened, `ts` in Unix seconds."""

    ts: float
    events: tuple[KVEvent, ...]
    data_parallel_rank: int | None = None


def seq_bytes(seq: int) -> bytes:
    """`seq` as the wire's 8-byte big-endian frame (signed, so END_SEQ is all ones)."""
    return seq.to_bytes(8, "big", signed=seq < 0)


def parse_seq(frame: bytes) -> int:
    """An 8-byte big-endian seq frame; the all-ones frame is END_SEQ. Raises KVEventDecodeError."""
    if len(frame) != 8:
        raise KVEventDecodeError(f"seq: expected 8 bytes, got {len(frame)}")
    value = int.from_bytes(frame, "big")
    return END_SEQ if value == (1 << 64) - 1 else value


# -- encoding ---------------------------------------------------------------

def _event_fields(event: KVEvent, event_format: EventFormat) -> list[tuple[str, Any]]:
    """Field (name, value) pairs in vLLM's declaration order.

    Map form writes `lora_name` always (current vLLM declares it without a
    default); array form stops after `medium`, as vLLM's array-era structs did,
    unless a lora_name is set.
    """
    if isinstance(event, BlockStored):
        fields: list[tuple[str, Any]] = [
            ("block_hashes", list(event.block_hashes)), ("parent_block_hash", event.parent_block_hash),
            ("token_ids", list(event.token_ids)), ("block_size", event.block_size),
            ("lora_id", event.lora_id), ("medium", event.medium),
        ]
        if event_format == "map" or event.lora_name is not None:
            fields.append(("lora_name", event.lora_name))
        return fields
    if isinstance(event, BlockRemoved):
        return [("block_hashes", list(event.block_hashes)), ("medium", event.medium)]
    return []


def encode_event(event: KVEvent, event_format: EventFormat = "map") -> Any:
    """The msgpack-ready form of one event: a tagged map or a tagged array."""
    tag = type(event).__name__
    fields = _event_fields(event, event_format)
    if event_format == "array":
        return [tag, *(value for _, value in fields)]
    return {"type": tag, **dict(fields)}


def encode_batch(batch: KVEventBatch, event_format: EventFormat = "map") -> bytes:
    """msgpack bytes of `batch` as vLLM writes them (`"map"`: current vLLM; `"array"`: before #42892)."""
    if event_format not in EVENT_FORMATS:
        raise ValueError(f"event_format must be one of {EVENT_FORMATS}, got {event_format!r}")
    body: list[Any] = [batch.ts, [encode_event(e, event_format) for e in batch.events]]
    if batch.data_parallel_rank is not None:
        body.append(batch.data_parallel_rank)
    return bytes(msgpack.packb(body, use_bin_type=True))


# -- decoding ---------------------------------------------------------------

# Field specs: (name, kind, required). Kinds are checked by _check.
_SPECS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "BlockStored": (
        ("block_hashes", "hashes", True), ("parent_block_hash", "hash?", True), ("token_ids", "ints", True),
        ("block_size", "int", True), ("lora_id", "int?", False), ("medium", "str?", False),
        ("lora_name", "str?", False),
    ),
    "BlockRemoved": (("block_hashes", "hashes", True), ("medium", "str?", False)),
    "AllBlocksCleared": (),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(path: str, kind: str, value: Any) -> Any:
    """`value` converted to the dataclass field type, or KVEventDecodeError naming `path`."""
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    if kind == "int" and _is_int(value):
        return value
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "hash" and (_is_int(value) or isinstance(value, bytes)):
        return value
    if kind in ("ints", "hashes") and isinstance(value, list):
        item = "int" if kind == "ints" else "hash"
        return tuple(_check(f"{path}[{i}]", item, v) for i, v in enumerate(value))
    expected = {"ints": "list of int", "hashes": "list of int|bytes", "hash": "int|bytes"}.get(kind, kind)
    raise KVEventDecodeError(f"{path}: expected {expected}{' or None' if kind != 'ints' else ''}"
                             f", got {type(value).__name__}")


def _raw_fields(path: str, raw: Any) -> tuple[str, dict[str, Any] | list[Any]]:
    """(tag, fields) of a tagged map or tagged array."""
    fields: dict[str, Any] | list[Any]
    if isinstance(raw, dict):
        fields = {k: v for k, v in raw.items() if k != "type"}
        tag = raw.get("type")
    elif isinstance(raw, list) and raw:
        tag, fields = raw[0], raw[1:]
    else:
        raise KVEventDecodeError(f"{path}: expected a tagged array or map, got {type(raw).__name__}")
    if not isinstance(tag, str) or tag not in _SPECS:
        raise KVEventDecodeError(f"{path}: unknown event tag {tag!r}")
    return tag, fields


def decode_event(raw: Any, path: str = "event") -> KVEvent:
    """One event from its msgpack-decoded form (tagged array or tagged map)."""
    tag, fields = _raw_fields(path, raw)
    values: dict[str, Any] = {}
    for i, (name, kind, required) in enumerate(_SPECS[tag]):
        here = f"{path}({tag}).{name}"
        present = name in fields if isinstance(fields, dict) else i < len(fields)
        if not present:
            if required:
                raise KVEventDecodeError(f"{here}: missing")
            continue
        values[name] = _check(here, kind, fields[name] if isinstance(fields, dict) else fields[i])
    if tag == "BlockStored":
        return BlockStored(**values)
    if tag == "BlockRemoved":
        return BlockRemoved(**values)
    return AllBlocksCleared()


def decode_batch(payload: bytes) -> KVEventBatch:
    """A KVEventBatch from msgpack bytes. Raises KVEventDecodeError on anything malformed."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise KVEventDecodeError(f"payload: not msgpack: {exc}") from exc
    if not isinstance(raw, list) or len(raw) < 2:
        raise KVEventDecodeError("payload: expected an array [ts, events, data_parallel_rank?]")
    ts, events = raw[0], raw[1]
    if not (isinstance(ts, float) or _is_int(ts)):
        raise KVEventDecodeError(f"ts: expected float, got {type(ts).__name__}")
    if not isinstance(events, list):
        raise KVEventDecodeError(f"events: expected array, got {type(events).__name__}")
    rank = _check("data_parallel_rank", "int?", raw[2]) if len(raw) > 2 else None
    decoded = tuple(decode_event(e, f"events[{i}]") for i, e in enumerate(events))
    return KVEventBatch(float(ts), decoded, rank)


def block_stored(hashes: Sequence[BlockHash], parent: BlockHash | None, tokens: Sequence[int],
                 block_size: int, medium: str | None = MEDIUM_GPU) -> BlockStored:
    """A BlockStored for consecutive full blocks; checks that `tokens` cover exactly `hashes`."""
    if len(tokens) != len(hashes) * block_size:
        raise ValueError(f"{len(hashes)} blocks of {block_size} need {len(hashes) * block_size} tokens, "
                         f"got {len(tokens)}")
    return BlockStored(tuple(hashes), parent, tuple(tokens), block_size, medium=medium)
