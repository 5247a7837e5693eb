"""MLX KV arrays <-> the prefix cache: slicing, zstd packing, mlx-lm cache objects.

A sequence's KV is a list with one `(keys, values)` pair per layer, each array
shaped `(1, kv_heads, tokens, head_dim)`. Packing stores raw array bytes (any
dtype, bfloat16 included, via an unsigned-integer view) behind a small JSON
header, compressed with zstd. Call only from the MLX engine thread.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import mlx.core as mx
import numpy as np
import zstandard
from mlx_lm.models.cache import KVCache

LayerKV = tuple[mx.array, mx.array]
_UINT_OF_SIZE = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


class MlxKVCodec:
    """`KVCodec` for mlx arrays; `level` is the zstd compression level."""

    def __init__(self, level: int = 3) -> None:
        self.level = level

    def length(self, kv: list[LayerKV]) -> int:
        return int(kv[0][0].shape[2]) if kv else 0

    def slice(self, kv: list[LayerKV], n: int) -> list[LayerKV]:
        out = [(k[..., :n, :], v[..., :n, :]) for k, v in kv]
        mx.eval(out)
        return out

    def pack(self, kv: list[LayerKV]) -> bytes:
        header: list[dict[str, Any]] = []
        chunks: list[bytes] = []
        for array in (a for pair in kv for a in pair):
            raw = np.array(array.view(_UINT_OF_SIZE[array.itemsize]), copy=False)
            header.append({"dtype": str(array.dtype).removeprefix("mlx.core."), "shape": list(array.shape)})
            chunks.append(raw.tobytes())
        head = json.dumps(header).encode()
        body = struct.pack("<I", len(head)) + head + b"".join(chunks)
        return zstandard.ZstdCompressor(level=self.level).compress(body)

    def unpack(self, blob: bytes) -> list[LayerKV]:
        body = zstandard.ZstdDecompressor().decompress(blob)
        (head_len,) = struct.unpack_from("<I", body)
        header = json.loads(body[4 : 4 + head_len])
        offset, arrays = 4 + head_len, []
        for spec in header:
            dtype = getattr(mx, spec["dtype"])
            size = dtype.size
            count = int(np.prod(spec["shape"]))
            raw = np.frombuffer(body, dtype=f"<u{size}", count=count, offset=offset)
            arrays.append(mx.array(raw.reshape(spec["shape"])).view(dtype))
            offset += count * size
        mx.eval(arrays)
        return list(zip(arrays[::2], arrays[1::2], strict=True))


def to_mlx_caches(kv: list[LayerKV] | None, num_layers: int) -> list[KVCache]:
    """Per-layer mlx-lm `KVCache` objects primed with `kv` (empty caches for None)."""
    caches = []
    for i in range(num_layers):
        cache = KVCache()  # type: ignore[no-untyped-call]
        if kv is not None:
            cache.keys, cache.values = kv[i]
            cache.offset = int(kv[i][0].shape[2])
        caches.append(cache)
    return caches


def from_mlx_caches(caches: list[Any]) -> list[LayerKV]:
    """The `(keys, values)` of single-sequence mlx-lm caches, trimmed to their offsets."""
    out = [(c.keys[..., : c.offset, :], c.values[..., : c.offset, :]) for c in caches]
    mx.eval(out)
    return out
