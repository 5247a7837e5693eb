"""Chunk keys must equal what LMCache 0.5.6's ChunkedTokenDatabase computes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvproto.chunks import CHUNK_SIZE, chunk_keys, chunk_spans

# hash((0, tuple(range(256)), ())) and the next link, pinned so a change of formula
# (e.g. `None` instead of `()` as the extra-keys slot) cannot slip through.
GOLDEN_RANGE_512 = [3131758554629441992, 8783757053568497755]


def test_golden_values_match_the_lmcache_formula() -> None:
    tokens = list(range(512))
    assert chunk_keys(tokens) == GOLDEN_RANGE_512
    k0 = hash((0, tuple(range(256)), ()))
    assert GOLDEN_RANGE_512 == [k0, hash((k0, tuple(range(256, 512)), ()))]


@pytest.mark.parametrize(
    ("n", "expected"), [(0, 0), (255, 0), (256, 1), (511, 1), (512, 2), (1000, 3)]
)
def test_only_full_chunks_get_keys(n: int, expected: int) -> None:
    assert len(chunk_keys([5] * n)) == expected


def test_keys_chain_through_the_prefix() -> None:
    base = list(range(1000, 1000 + 3 * CHUNK_SIZE))
    longer = base + [1, 2, 3] * 200
    assert chunk_keys(longer)[:3] == chunk_keys(base)
    changed = list(base)
    changed[0] += 1  # a change in chunk 0 changes every later key
    assert set(chunk_keys(changed)).isdisjoint(chunk_keys(base))


def test_partial_spans_include_the_tail_like_the_controller_lookup() -> None:
    tokens = list(range(300))
    spans = chunk_spans(tokens, partial=True)
    assert [end for end, _ in spans] == [256, 300]
    assert spans[0][1] == chunk_keys(tokens)[0]
    assert chunk_spans(tokens) == spans[:1]


def test_custom_chunk_size_and_bad_size() -> None:
    assert len(chunk_keys(list(range(40)), chunk_size=16)) == 2
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_keys([1, 2], chunk_size=0)


def test_keys_do_not_depend_on_pythonhashseed() -> None:
    code = "import json;from kvproto.chunks import chunk_keys;print(json.dumps(chunk_keys(list(range(512)))))"
    for seed in ("0", "12345", "random"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(out.stdout) == GOLDEN_RANGE_512


def _real_lmcache_python() -> str | None:
    """An interpreter that can import lmcache: this one, or the real controller's venv."""
    if importlib.util.find_spec("lmcache") is not None:
        return sys.executable
    controller = os.environ.get("KVGATE_REAL_LMCACHE")
    if controller:
        candidate = Path(controller).resolve().parent / "python"
        if candidate.exists():
            return str(candidate)
    return None


@pytest.mark.skipif(_real_lmcache_python() is None,
                    reason="needs lmcache importable here or KVGATE_REAL_LMCACHE (CI installs it)")
def test_equal_to_real_lmcache_token_database() -> None:
    code = (
        "import json\n"
        "from lmcache.v1.token_database import ChunkedTokenDatabase\n"
        "keys = [k for _, end, k in ChunkedTokenDatabase().process_tokens(list(range(700)), make_key=False)"
        " if end % 256 == 0]\n"
        "print(json.dumps(keys))\n"
    )
    python = _real_lmcache_python()
    assert python is not None
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    real = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(real) == 2 and real == chunk_keys(list(range(700)))
