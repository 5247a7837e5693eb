"""`kvgate bench routing` at a tiny scale: results structure and routing sanity, never timings.

Peer routers run only where `.peers/` holds them (scripts/peer-routers.sh); CI
does not install them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from kvbench import routing
from kvbench.oracle import choose
from kvbench.peers import PEERS, unavailable
from kvbench.workloads import WORKLOADS, build

pytestmark = pytest.mark.slow


def test_workloads_are_deterministic_and_know_their_groups_and_ceilings() -> None:
    for name in WORKLOADS:
        a, b = build(name, 0.1, seed=3), build(name, 0.1, seed=3)
        assert [r.body for r in a.requests] == [r.body for r in b.requests], name
        assert all(r.group and 0 <= r.ceiling_tokens < r.prompt_tokens for r in a.requests), name
    assert build("no-sharing", 0.1).ceiling < 0.05
    assert build("multi-tenant", 0.5).ceiling > 0.8
    assert build("heterogeneous", 0.1).slow_backends == 2


def test_multi_turn_resends_the_history() -> None:
    workload = build("multi-turn", 0.1)
    first = workload.sessions[0]
    assert [len(r.body["messages"]) for r in first] == [2, 4, 6, 8, 10]
    assert first[1].body["messages"][:2] == first[0].body["messages"]
    assert first[1].ceiling_tokens >= first[0].prompt_tokens - 16


def test_oracle_keeps_a_group_on_its_first_backend_and_places_new_groups_by_load() -> None:
    backends, assigned, inflight = ["a", "b", "c"], {}, Counter({"a": 2, "b": 0, "c": 1})
    assert choose("g1", backends, assigned, inflight) == "b"
    inflight["b"] = 5
    assert choose("g1", backends, assigned, inflight) == "b"
    assert choose("g2", backends, assigned, inflight) == "c"
    assert choose(None, backends, assigned, inflight) == "c" and None not in assigned


def _policies() -> list[str]:
    return ["cache_aware", "round_robin", "oracle", *(p for p in PEERS if unavailable(p) is None)]


def test_tiny_suite_answers_every_request_and_oracle_beats_round_robin(tmp_path: Path) -> None:
    policies = _policies()
    argv = ["--workloads", "burst,multi-tenant", "--policies", ",".join(policies),
            "--requests-scale", "0.05", "--out", str(tmp_path), "--no-progress"]
    assert routing.main(argv) == 0
    data = json.loads((tmp_path / "routing.json").read_text())
    results = {(r["workload"], r["policy"]): r for r in data["results"]}
    assert set(results) == {(w, p) for w in ("burst", "multi-tenant") for p in policies}
    for (workload, _policy), r in results.items():
        expected = len(build(workload, 0.05).requests)
        assert r["requests"] == expected and r["errors"] == 0
        assert sum(r["per_backend"].values()) == expected
        assert all(s["error"] is None and s["prompt_tokens"] > 0 for s in r["samples"])
        assert 0.0 <= r["hit_ratio"] <= data["ceilings"][workload] + 1e-3
    for workload in ("burst", "multi-tenant"):
        assert results[(workload, "oracle")]["hit_ratio"] >= results[(workload, "round_robin")]["hit_ratio"]
    assert results[("multi-tenant", "oracle")]["hit_ratio"] > 0.8 * data["ceilings"]["multi-tenant"] > 0
    assert results[("burst", "round_robin")]["decisions"] == {"lb:round_robin": len(build("burst", 0.05).requests)}
    rerendered = tmp_path / "again"
    assert routing.main(["--from-json", str(tmp_path / "routing.json"), "--out", str(rerendered)]) == 0
    again = json.loads((rerendered / "routing.json").read_text())
    assert [r["hit_ratio"] for r in again["results"]] == [r["hit_ratio"] for r in data["results"]]
    assert again["command"] == data["command"]
