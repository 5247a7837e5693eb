"""vLLM KV-event wire format: round trips, byte-exact encodings, strict-but-tolerant decoding."""

from __future__ import annotations

import msgpack
import pytest

from kvproto.kv_events import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventDecodeError,
    block_stored,
    decode_batch,
    encode_batch,
    parse_seq,
    seq_bytes,
)

BATCH = KVEventBatch(
    ts=1.5,
    events=(
        BlockStored((1,), None, (1, 2), 2, None, "GPU"),
        BlockRemoved((1, 2**64 - 1, -5, b"\x01\x02")),
        AllBlocksCleared(),
    ),
    data_parallel_rank=0,
)

# What msgspec writes for vLLM's structs, spelled out byte by byte.
TS = b"\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00"  # float64 1.5
STORED_ARRAY = b"\x97\xabBlockStored" + b"\x91\x01" + b"\xc0" + b"\x92\x01\x02" + b"\x02" + b"\xc0" + b"\xa3GPU"
STORED_MAP = (b"\x88\xa4type\xabBlockStored" + b"\xacblock_hashes\x91\x01" + b"\xb1parent_block_hash\xc0"
              + b"\xa9token_ids\x92\x01\x02" + b"\xaablock_size\x02" + b"\xa7lora_id\xc0" + b"\xa6medium\xa3GPU"
              + b"\xa9lora_name\xc0")


def test_round_trip_both_formats() -> None:
    for fmt in ("map", "array"):
        assert decode_batch(encode_batch(BATCH, fmt)) == BATCH


def test_array_encoding_matches_vllm_bytes() -> None:
    batch = KVEventBatch(1.5, (BATCH.events[0], AllBlocksCleared()), 0)
    expected = b"\x93" + TS + b"\x92" + STORED_ARRAY + b"\x91\xb0AllBlocksCleared" + b"\x00"
    assert encode_batch(batch, "array") == expected
    assert decode_batch(expected) == batch


def test_map_encoding_matches_vllm_bytes() -> None:
    removed = BlockRemoved((7,))
    batch = KVEventBatch(1.5, (BATCH.events[0], removed), None)
    removed_map = b"\x83\xa4type\xacBlockRemoved\xacblock_hashes\x91\x07\xa6medium\xa3GPU"
    expected = b"\x92" + TS + b"\x92" + STORED_MAP + removed_map  # no rank: omitted, as msgspec does
    assert encode_batch(batch, "map") == expected
    assert decode_batch(expected) == batch


def test_decodes_a_current_vllm_batch_with_extra_fields() -> None:
    """As vLLM 0.26 sends it (kthena#1535): map events with extra_keys, group_idx, spec kind."""
    event = {"type": "BlockStored", "block_hashes": [15760518052499183552], "parent_block_hash": None,
             "token_ids": list(range(16)), "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None,
             "extra_keys": [None], "group_idx": 0, "kv_cache_spec_kind": "full_attention"}
    batch = decode_batch(msgpack.packb([1789095808.8, [event], 0]))
    assert batch.events == (BlockStored((15760518052499183552,), None, tuple(range(16)), 16, None, "GPU"),)
    assert batch.data_parallel_rank == 0


def test_tolerates_extra_trailing_fields_and_old_short_forms() -> None:
    raw = [2.0, [["BlockStored", [1], 9, [5, 6], 2, None, "GPU", None, "future"], ["BlockRemoved", [1]],
                 ["BlockStored", [2], None, [7, 8], 2, 3]], 1, "future"]
    batch = decode_batch(msgpack.packb(raw))
    assert batch.events == (BlockStored((1,), 9, (5, 6), 2, None, "GPU"), BlockRemoved((1,), "GPU"),
                            BlockStored((2,), None, (7, 8), 2, 3, "GPU"))
    assert (batch.ts, batch.data_parallel_rank) == (2.0, 1)


@pytest.mark.parametrize(("raw", "message"), [
    ([1.0, [["BlockStored", [1], None, ["x"], 2, None, "GPU"]]],
     r"events\[0\]\(BlockStored\).token_ids\[0\]: expected int"),
    ([1.0, [["BlockStored", [1], None, [1, 2]]]], r"events\[0\]\(BlockStored\).block_size: missing"),
    ([1.0, [{"type": "BlockRemoved", "medium": "GPU"}]], r"events\[0\]\(BlockRemoved\).block_hashes: missing"),
    ([1.0, [["BlockMoved", [1]]]], r"events\[0\]: unknown event tag 'BlockMoved'"),
    ([1.0, [["BlockStored", [1.5], None, [1, 2], 2, None, "GPU"]]], r"block_hashes\[0\]: expected int\|bytes"),
    ([1.0, [["BlockStored", [1], None, [1, 2], True, None, "GPU"]]], r"block_size: expected int"),
    ([1.0, [7]], r"events\[0\]: expected a tagged array or map"),
    (["now", []], r"ts: expected float"),
    ([1.0, {}], r"events: expected array"),
    ({"ts": 1.0}, r"payload: expected an array"),
])
def test_rejects_malformed_with_a_path(raw: object, message: str) -> None:
    with pytest.raises(KVEventDecodeError, match=message):
        decode_batch(msgpack.packb(raw))


def test_rejects_non_msgpack() -> None:
    with pytest.raises(KVEventDecodeError, match="payload"):
        decode_batch(b"\xc1")


def test_seq_frames() -> None:
    assert seq_bytes(1) == b"\x00" * 7 + b"\x01"
    assert seq_bytes(END_SEQ) == b"\xff" * 8
    assert parse_seq(seq_bytes(2**40)) == 2**40
    assert parse_seq(b"\xff" * 8) == END_SEQ
    with pytest.raises(KVEventDecodeError):
        parse_seq(b"\x01")


def test_block_stored_checks_token_count() -> None:
    assert block_stored([1, 2], None, range(4), 2).token_ids == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="need 4 tokens"):
        block_stored([1, 2], None, range(3), 2)
