"""MlxKVCodec: zstd round trip of real MLX arrays, bfloat16 included."""

from __future__ import annotations

import mlx.core as mx

from mlxd.kv_codec import MlxKVCodec, from_mlx_caches, to_mlx_caches


def test_pack_unpack_round_trip_keeps_dtype_shape_and_values() -> None:
    codec = MlxKVCodec()
    kv = [(mx.random.normal((1, 2, 37, 16)).astype(mx.bfloat16), mx.random.normal((1, 2, 37, 16)))
          for _ in range(3)]
    back = codec.unpack(codec.pack(kv))
    assert codec.length(back) == 37
    for (k, v), (k2, v2) in zip(kv, back, strict=True):
        assert k2.dtype == mx.bfloat16 and v2.dtype == mx.float32
        assert mx.array_equal(k, k2).item() and mx.array_equal(v, v2).item()


def test_slice_and_mlx_cache_conversion() -> None:
    codec = MlxKVCodec()
    kv = [(mx.arange(40, dtype=mx.float32).reshape(1, 1, 10, 4),) * 2]
    short = codec.slice(kv, 3)
    caches = to_mlx_caches(short, 1)
    assert caches[0].offset == 3
    again = from_mlx_caches(caches)
    assert mx.array_equal(again[0][0], kv[0][0][..., :3, :]).item()
    assert to_mlx_caches(None, 2)[1].offset == 0
