"""Message framing and validation, as the real controller (msgspec) accepts them."""

from __future__ import annotations

import json

import msgpack
import pytest

from kvproto.messages import ProtocolError, decode, encode, encode_json, kv_ops, make


def test_msgpack_round_trip_with_type_tag_first() -> None:
    msg = make(
        "RegisterMsg", instance_id="a", worker_id=0, ip="127.0.0.1", port=5, peer_init_url=None
    )
    frame = encode(msg)
    raw = msgpack.unpackb(frame, raw=False)
    assert next(iter(raw)) == "type"
    assert raw["type"] == "RegisterMsg"
    assert decode(frame) == msg


def test_json_frames_are_accepted() -> None:
    ops = kv_ops("admit", [11, 12], first_seq=4)
    msg = make(
        "BatchedKVOperationMsg",
        instance_id="i",
        worker_id=1,
        location="LocalCPUBackend",
        operations=ops,
    )
    frame = encode_json(msg)
    assert frame.startswith(b"{")
    assert decode(frame) == msg
    assert [op["seq_num"] for op in decode(frame)["operations"]] == [4, 5]


def test_defaults_are_filled_and_extra_fields_dropped() -> None:
    compress = decode(
        msgpack.packb(
            {
                "type": "CompressWorkerMsg",
                "worker_event_id": "e",
                "method": "zstd",
                "location": "L",
                "future_field": 1,
            }
        )
    )
    assert compress["tokens"] is None
    assert "future_field" not in compress
    assert make("RegisterRetMsg") == {"type": "RegisterRetMsg", "extra_config": {}}
    assert make("HeartbeatRetMsg")["commands"] == []


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"type": "NoSuchMsg"}, "unknown message type"),
        ({"instance_id": "x"}, "unknown message type"),
        (
            {"type": "PinWorkerMsg", "worker_event_id": "e", "location": "L"},
            "missing field 'tokens'",
        ),
        ({"type": "HealthWorkerRetMsg", "error_code": True}, "error_code"),
        (
            {"type": "PinWorkerMsg", "worker_event_id": "e", "location": "L", "tokens": [1, "2"]},
            "tokens",
        ),
        (
            {
                "type": "BatchedKVOperationMsg",
                "instance_id": "i",
                "worker_id": 0,
                "location": "L",
                "operations": [{"op_type": "upsert", "key": 1, "seq_num": 0}],
            },
            "operations",
        ),
    ],
)
def test_invalid_messages_name_the_problem(raw: dict[str, object], needle: str) -> None:
    with pytest.raises(ProtocolError, match=needle):
        decode(msgpack.packb(raw))
    with pytest.raises(ProtocolError, match=needle):
        decode(json.dumps(raw).encode())


@pytest.mark.parametrize("frame", [b"\xc1\xc1", b"{not json", msgpack.packb([1, 2]), b""])
def test_garbage_frames_raise_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(frame)


def test_encode_refuses_invalid_messages() -> None:
    with pytest.raises(ProtocolError, match="num_tokens"):
        encode({"type": "PinWorkerRetMsg", "num_tokens": "7"})


def test_large_signed_keys_survive_both_encodings() -> None:
    keys = [-(2**63), 2**63 - 1, -1]
    msg = make(
        "BatchedKVOperationMsg",
        instance_id="i",
        worker_id=0,
        location="L",
        operations=kv_ops("evict", keys, 0),
    )
    for frame in (encode(msg), encode_json(msg)):
        assert [op["key"] for op in decode(frame)["operations"]] == keys


def test_a_deeply_nested_json_frame_is_a_protocol_error() -> None:
    """It used to escape `decode` as RecursionError, past every `except ProtocolError`."""
    frame = b'{"type": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(ProtocolError):
        decode(frame)
