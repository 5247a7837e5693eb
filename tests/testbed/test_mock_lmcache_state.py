"""The mock controller's registry semantics, table-driven (no I/O)."""

from __future__ import annotations

from typing import Any

import pytest

from kvproto.chunks import chunk_keys
from kvproto.messages import kv_ops
from testbed.mock_lmcache.state import Registry

TOKENS = list(range(5000, 5000 + 4 * 256))
KEYS = chunk_keys(TOKENS)


def reg_msg(instance: str, worker: int = 0, ip: str = "127.0.0.1", port: int = 1) -> dict[str, Any]:
    return {
        "instance_id": instance,
        "worker_id": worker,
        "ip": ip,
        "port": port,
        "peer_init_url": None,
    }


def ops(instance: str, op: str, keys: list[int], seq: int = 0, worker: int = 0,
        location: str = "LocalCPUBackend") -> dict[str, Any]:  # fmt: skip
    return {"instance_id": instance, "worker_id": worker, "location": location,
            "operations": kv_ops(op, keys, seq)}  # fmt: skip


def registry_with(holdings: dict[str, list[int]]) -> Registry:
    """Instances registered in dict order, each admitting the chunk indexes given."""
    reg = Registry()
    for instance, chunks in holdings.items():
        reg.register(reg_msg(instance))
        reg.apply_ops(ops(instance, "admit", [KEYS[i] for i in chunks]))
    return reg


@pytest.mark.parametrize(
    ("holdings", "tokens", "expected"),
    [
        ({}, TOKENS, {}),
        ({"a": [0, 1, 2, 3]}, TOKENS, {"a": ("LocalCPUBackend", 1024)}),
        ({"a": [0, 1, 2, 3]}, TOKENS[:700], {"a": ("LocalCPUBackend", 512)}),
        ({"a": [0, 1, 2, 3]}, TOKENS[:200], {}),
        ({"a": [0, 2, 3]}, TOKENS, {"a": ("LocalCPUBackend", 256)}),
        ({"a": [1, 2]}, TOKENS, {}),
        # chunks go to the first-registered holder; a later holder appears only where it is first
        ({"a": [0, 1], "b": [0, 1, 2]}, TOKENS, {"a": ("LocalCPUBackend", 512), "b": ("LocalCPUBackend", 768)}),
        ({"b": [0, 1, 2], "a": [0, 1]}, TOKENS, {"b": ("LocalCPUBackend", 768)}),
    ],
)  # fmt: skip
def test_lookup_prefix_walk(
    holdings: dict[str, list[int]], tokens: list[int], expected: dict[str, Any]
) -> None:
    assert registry_with(holdings).lookup(tokens) == expected


def test_ops_from_unregistered_workers_are_dropped() -> None:
    reg = Registry()
    assert not reg.apply_ops(ops("ghost", "admit", KEYS))
    assert reg.lookup(TOKENS) == {}


def test_duplicate_registration_clears_keys_and_keeps_endpoint() -> None:
    reg = registry_with({"a": [0, 1]})
    worker, created = reg.register(reg_msg("a", port=999))
    assert not created and worker.port == 1
    assert reg.lookup(TOKENS) == {}


def test_heartbeat_from_unknown_worker_reregisters_and_asks_for_full_sync() -> None:
    reg = Registry()
    commands = reg.heartbeat(reg_msg("a"), now=10.0)
    assert [c["reason"] for c in commands] == ["worker_re_registered"]
    assert reg.get("a", 0) is not None
    assert reg.heartbeat(reg_msg("a"), now=11.0) == []
    assert reg.get("a", 0).last_heartbeat_time == 11.0  # type: ignore[union-attr]


def test_expiry_and_deregistration_drop_instances() -> None:
    reg = Registry()
    reg.register(reg_msg("old"), now=0.0)
    reg.register(reg_msg("new"), now=100.0)
    dead = reg.expire(timeout=50.0, now=120.0)
    assert [w.instance_id for w in dead] == ["old"]
    assert list(reg.instances) == ["new"]
    assert reg.deregister("new", 0) is not None and reg.instances == {}
    assert reg.deregister("new", 0) is None


def test_stale_keeps_evicted_chunks_visible_until_turned_off() -> None:
    reg = registry_with({"a": [0, 1]})
    reg.set_stale(True)
    reg.apply_ops(ops("a", "evict", [KEYS[1]], seq=2))
    assert reg.lookup(TOKENS) == {"a": ("LocalCPUBackend", 512)}
    assert reg.key_stats()["total_key_count"] == 1  # stats tell the truth
    reg.set_stale(False)
    assert reg.lookup(TOKENS) == {"a": ("LocalCPUBackend", 256)}


def test_forget_and_sequence_discontinuities() -> None:
    reg = registry_with({"a": [0, 1, 2], "b": [0]})
    assert reg.forget("a", KEYS[:2]) == 2
    assert reg.lookup(TOKENS) == {"b": ("LocalCPUBackend", 256)}
    reg.apply_ops(ops("a", "admit", [KEYS[3]], seq=10))  # expected 3
    assert reg.seq_discontinuities == 1


def test_key_stats_and_instance_by_ip() -> None:
    reg = registry_with({"a": [0, 1], "b": [2]})
    reg.register(reg_msg("c", ip="10.1.2.3"))
    stats = reg.key_stats()
    assert stats["total_key_count"] == 3 and stats["total_instance_count"] == 3
    assert [i["key_count"] for i in stats["instances"]] == [2, 1, 0]
    assert reg.instance_by_ip("10.1.2.3") == "c"
    assert reg.instance_by_ip("127.0.0.1") == "a"
    assert reg.instance_by_ip("10.9.9.9") is None


def test_all_workers_list_is_cached_for_its_ttl() -> None:
    reg = Registry(worker_list_ttl=30.0)
    assert reg.all_worker_infos(now=1000.0) == []
    reg.register(reg_msg("a"), now=1001.0)
    assert reg.all_worker_infos(now=1020.0) == []  # still the cached list
    assert [i["instance_id"] for i in reg.all_worker_infos(now=1031.0)] == ["a"]
    assert [i["instance_id"] for i in Registry(worker_list_ttl=0).all_worker_infos()] == []
