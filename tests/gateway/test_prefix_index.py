"""The in-process block index: engine events (stored, removed, cleared), prefixes in
flight, learned entries with a TTL, replicas."""

from __future__ import annotations

from gateway.prefix_index import PrefixIndex, block_keys

PROMPT = list(range(1000, 1000 + 100))  # 6 full blocks of 16 + 4 tokens


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def store(index: PrefixIndex, endpoint: str, tokens: list[int], first_hash: int = 0, parent: int | None = None) -> None:
    n = len(tokens) // 16
    index.stored(endpoint, [first_hash + i for i in range(n)], parent, tokens[:n * 16], 16)


def test_block_keys_chain_full_blocks_only() -> None:
    keys = block_keys(PROMPT)
    assert len(keys) == 6 and len(set(keys)) == 6
    assert block_keys(PROMPT[:32]) == keys[:2]  # a key names the whole prefix before it
    assert block_keys(PROMPT[:15]) == []
    assert block_keys([9] + PROMPT[1:])[1:] != keys[1:]  # a different first block changes every key


def test_stored_blocks_match_every_replica_to_its_depth() -> None:
    index = PrefixIndex()
    store(index, "a", PROMPT[:96])
    store(index, "b", PROMPT[:48], first_hash=100)
    assert index.match(block_keys(PROMPT), ["a", "b", "c"]) == {"a": 96, "b": 48}
    assert index.match(block_keys(PROMPT), ["b"]) == {"b": 48}  # only the candidates asked about


def test_a_stored_event_continues_from_its_parent_block() -> None:
    index = PrefixIndex()
    store(index, "a", PROMPT[:32], first_hash=10)  # hashes 10, 11
    index.stored("a", [12, 13], 11, PROMPT[32:64], 16)  # the next two blocks, parent = hash 11
    assert index.match(block_keys(PROMPT), ["a"]) == {"a": 64}


def test_blocks_with_an_unknown_parent_are_skipped() -> None:
    index = PrefixIndex()
    assert index.stored("a", [12, 13], 999, PROMPT[32:64], 16) == 0
    assert index.match(block_keys(PROMPT), ["a"]) == {}


def test_removed_and_cleared_blocks_are_forgotten() -> None:
    index = PrefixIndex()
    store(index, "a", PROMPT[:96])
    store(index, "b", PROMPT[:96], first_hash=100)
    index.removed("a", [2])  # the third block goes: a's match ends before it
    assert index.match(block_keys(PROMPT), ["a", "b"]) == {"a": 32, "b": 96}
    index.cleared("b")
    assert index.match(block_keys(PROMPT), ["a", "b"]) == {"a": 32}
    assert index.stored_blocks("b") == 0


def test_other_block_sizes_are_ignored() -> None:
    index = PrefixIndex()
    assert index.stored("a", [1], None, PROMPT[:32], 32) == 0


def test_a_prefix_in_flight_is_a_future_hit_until_it_settles() -> None:
    index = PrefixIndex()
    keys = block_keys(PROMPT)
    index.expect("a", keys)
    index.expect("a", keys)  # two requests of the same prefix in flight
    assert index.match(keys, ["a", "b"]) == {"a": 96}
    index.settle("a", keys, served=False, learn=True)
    assert index.match(keys, ["a"]) == {"a": 96}  # the other one is still in flight
    index.settle("a", keys, served=False, learn=True)
    assert index.match(keys, ["a"]) == {}  # neither finished: nothing learned


def test_learned_entries_expire() -> None:
    clock = Clock()
    index = PrefixIndex(learned_ttl=10.0, clock=clock)
    keys = block_keys(PROMPT)
    index.expect("a", keys)
    index.settle("a", keys, served=True, learn=True)
    index.expect("b", keys)
    index.settle("b", keys, served=True, learn=False)  # b publishes events: those are authoritative
    assert index.match(keys, ["a", "b"]) == {"a": 96}
    clock.now = 11.0
    assert index.match(keys, ["a", "b"]) == {}


def test_learned_entries_are_bounded() -> None:
    index = PrefixIndex(max_learned=4)
    keys = block_keys(PROMPT)
    index.settle("a", keys, served=True, learn=True)
    assert index.stats()["learned_entries"] == 4
    assert index.match(keys, ["a"]) == {}  # the oldest (first) blocks went: no prefix left


def test_forget_endpoint_drops_everything_it_held() -> None:
    index = PrefixIndex()
    keys = block_keys(PROMPT)
    store(index, "a", PROMPT)
    index.expect("a", keys)
    index.forget_endpoint("a")
    assert index.match(keys, ["a"]) == {}
