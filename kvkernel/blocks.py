"""Prefix keys over fixed-size token blocks, the currency of the gateway's prefix index.

`key_i = hash((key_{i-1}, tuple(block_i)))` with `key_{-1} = 0`, over full blocks
only: a key names a whole prefix. CPython's `hash` of a tuple of ints does not
depend on PYTHONHASHSEED, so keys agree across processes and replicas.
"""

from __future__ import annotations

from collections.abc import Sequence

BLOCK_SIZE = 16  # vLLM's default KV block size


def block_keys(tokens: Sequence[int], block_size: int = BLOCK_SIZE, parent: int = 0) -> list[int]:
    """One key per full block of `tokens`, chained from `parent`."""
    keys: list[int] = []
    key = parent
    for start in range(0, len(tokens) - block_size + 1, block_size):
        key = hash((key, tuple(tokens[start:start + block_size])))
        keys.append(key)
    return keys
