"""LocalPrefixIndex: prefix matching per endpoint, TTL, size bound, forgetting."""

from __future__ import annotations

import pytest

from filters.local_index import LocalIndexConfig, LocalPrefixIndex, prompt_chunk_keys
from kvkernel.decode import ConfigError, decode_dataclass
from kvproto.chunks import chunk_keys


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tokens(n: int, seed: int = 0) -> list[int]:
    return [(seed * 7919 + i) % 50000 for i in range(n)]


SHARED = tokens(768)  # three full chunks


def test_keys_are_lmcache_chunk_keys() -> None:
    assert prompt_chunk_keys(SHARED + [1, 2, 3]) == chunk_keys(SHARED)
    assert len(prompt_chunk_keys(SHARED)) == 3


@pytest.mark.parametrize("learned,query,expected", [
    # endpoint learned 3 chunks; query shares them and goes on
    ({"a": SHARED}, SHARED + tokens(300, 1), {"a": 768}),
    # query shares only the first two chunks
    ({"a": SHARED}, SHARED[:512] + tokens(256, 2), {"a": 512}),
    # two endpoints, different depths
    ({"a": SHARED[:256], "b": SHARED}, SHARED, {"a": 256, "b": 768}),
    # different first chunk: nothing
    ({"a": SHARED}, tokens(768, 3), {}),
    # shorter than a chunk: nothing
    ({"a": SHARED}, SHARED[:200], {}),
])
def test_match(learned: dict[str, list[int]], query: list[int], expected: dict[str, int]) -> None:
    index = LocalPrefixIndex(100, 60.0)
    for ep, toks in learned.items():
        index.learn(ep, prompt_chunk_keys(toks))
    assert index.match(prompt_chunk_keys(query)) == expected


def test_match_restricted_to_given_endpoints() -> None:
    index = LocalPrefixIndex(100, 60.0)
    index.learn("a", prompt_chunk_keys(SHARED))
    index.learn("other-cluster", prompt_chunk_keys(SHARED))
    assert index.match(prompt_chunk_keys(SHARED), ["a", "b"]) == {"a": 768}


def test_entries_expire_after_ttl_and_relearning_refreshes() -> None:
    clock = Clock()
    index = LocalPrefixIndex(100, 10.0, clock=clock)
    keys = prompt_chunk_keys(SHARED)
    index.learn("a", keys)
    clock.now += 9
    index.learn("b", keys[:1])
    assert index.match(keys) == {"a": 768, "b": 256}
    clock.now += 2  # a expired, b still fresh
    assert index.match(keys) == {"b": 256}
    assert index.purge_expired() == 2  # chunks 2 and 3 had only `a`
    assert len(index) == 1


def test_size_bound_drops_least_recently_touched() -> None:
    index = LocalPrefixIndex(4, 60.0)
    first = prompt_chunk_keys(SHARED)            # 3 keys
    second = prompt_chunk_keys(tokens(512, 9))   # 2 more: one of `first` must go
    index.learn("a", first)
    index.learn("b", second)
    assert len(index) == 4
    # the oldest key (first chunk of `first`) went, so `first` no longer matches at all
    assert index.match(first) == {}
    assert index.match(second) == {"b": 512}


def test_forget_endpoint_keys() -> None:
    index = LocalPrefixIndex(100, 60.0)
    keys = prompt_chunk_keys(SHARED)
    index.learn("a", keys)
    index.learn("b", keys)
    assert index.forget("a", keys[1:]) == 2
    assert index.match(keys) == {"a": 256, "b": 768}
    assert index.forget("b") == 3
    assert index.match(keys) == {"a": 256}


@pytest.mark.parametrize("raw,error", [
    ({"max_chunks": 0}, "local_index.max_chunks: must be >= 1, got 0"),
    ({"ttl": "0s"}, "local_index.ttl: must be > 0"),
    ({"size": 3}, "local_index.size: unknown key"),
])
def test_config_errors_name_the_field(raw: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        decode_dataclass(LocalIndexConfig, raw, "local_index")
    assert error in str(info.value)
