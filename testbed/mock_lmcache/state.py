"""The mock controller's registry: instances -> workers -> location -> chunk keys.

Pure state, no I/O, mirroring lmcache 0.5.6 `RegistryTree` semantics:
- instances keep registration order; `/lookup` credits each chunk to the first
  instance (then worker, then location) holding it and stops at the first chunk
  nobody holds; a trailing partial chunk is hashed too (and so never matches);
- registering an already-registered worker clears its keys and keeps its old
  endpoint; a heartbeat from an unknown worker re-registers it and asks for a
  full sync; an instance disappears with its last worker;
- KV operations from unregistered workers are dropped;
- the list of all workers is cached for `worker_list_ttl` seconds (30 in LMCache).

The "stale" fault is modelled here: while it is on, evictions move keys to a
per-worker ghost set that lookups still see.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvproto.chunks import CHUNK_SIZE, chunk_spans


@dataclass
class Worker:
    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str | None
    registration_time: float
    last_heartbeat_time: float
    kv: dict[str, set[int]] = field(default_factory=dict)
    ghosts: dict[str, set[int]] = field(default_factory=dict)  # evicted while "stale" was on
    last_seq: dict[str, int] = field(default_factory=dict)

    def key_count(self) -> int:
        return sum(len(keys) for keys in self.kv.values())

    def find(self, key: int, stale: bool) -> str | None:
        """The first location holding `key` (ghosts count only when `stale`)."""
        for location, keys in self.kv.items():
            if key in keys:
                return location
        if stale:
            for location, keys in self.ghosts.items():
                if key in keys:
                    return location
        return None

    def info(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "worker_id": self.worker_id,
            "ip": self.ip,
            "port": self.port,
            "peer_init_url": self.peer_init_url,
            "registration_time": self.registration_time,
            "last_heartbeat_time": self.last_heartbeat_time,
        }


@dataclass
class Registry:
    """All registered workers and their reported chunks."""

    chunk_size: int = CHUNK_SIZE
    stale: bool = False
    worker_list_ttl: float = 30.0  # the real registry caches the all-workers list this long
    instances: dict[str, dict[int, Worker]] = field(default_factory=dict)
    seq_discontinuities: int = 0
    _listed: list[dict[str, Any]] = field(default_factory=list)
    _listed_at: float = 0.0

    # ---- registration ----------------------------------------------------------------

    def get(self, instance_id: str, worker_id: int) -> Worker | None:
        return self.instances.get(instance_id, {}).get(worker_id)

    def register(self, msg: Mapping[str, Any], now: float | None = None) -> tuple[Worker, bool]:
        """Register from a RegisterMsg/HeartbeatMsg; returns (worker, newly_created)."""
        existing = self.get(msg["instance_id"], msg["worker_id"])
        if existing is not None:
            existing.kv.clear()  # as the real controller does on duplicate registration
            existing.ghosts.clear()
            return existing, False
        stamp = time.time() if now is None else now
        worker = Worker(msg["instance_id"], msg["worker_id"], msg["ip"], msg["port"],
                        msg.get("peer_init_url"), stamp, stamp)  # fmt: skip
        workers = self.instances.setdefault(worker.instance_id, {})
        workers[worker.worker_id] = worker
        self.instances[worker.instance_id] = dict(sorted(workers.items()))
        return worker, True

    def heartbeat(self, msg: Mapping[str, Any], now: float | None = None) -> list[dict[str, Any]]:
        """Record a heartbeat; an unknown worker is re-registered and told to full-sync."""
        worker = self.get(msg["instance_id"], msg["worker_id"])
        if worker is None:
            self.register(msg, now)
            return [{"command_type": "full_sync", "reason": "worker_re_registered", "args": None}]
        worker.last_heartbeat_time = time.time() if now is None else now
        return []

    def deregister(self, instance_id: str, worker_id: int) -> Worker | None:
        workers = self.instances.get(instance_id)
        if workers is None or worker_id not in workers:
            return None
        worker = workers.pop(worker_id)
        if not workers:
            del self.instances[instance_id]
        return worker

    def expire(self, timeout: float, now: float | None = None) -> list[Worker]:
        """Deregister workers whose last heartbeat is older than `timeout` seconds."""
        stamp = time.time() if now is None else now
        dead = [w for w in self.workers() if stamp - w.last_heartbeat_time > timeout]
        for worker in dead:
            self.deregister(worker.instance_id, worker.worker_id)
        return dead

    def workers(self, instance_id: str | None = None) -> list[Worker]:
        if instance_id is not None:
            return list(self.instances.get(instance_id, {}).values())
        return [w for ws in self.instances.values() for w in ws.values()]

    def all_worker_infos(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every worker's info, cached for `worker_list_ttl` seconds as the real registry does.

        So `/query_worker_info {"instance_id":"all"}`, `GET /controller/workers` without
        filters and the registered-workers gauge may lag registrations by up to the TTL.
        """
        stamp = time.time() if now is None else now
        if stamp - self._listed_at > self.worker_list_ttl:
            self._listed = [w.info() for w in self.workers()]
            self._listed_at = stamp
        return self._listed

    def instance_by_ip(self, ip: str) -> str | None:
        for instance_id, workers in self.instances.items():
            if any(w.ip == ip for w in workers.values()):
                return instance_id
        return None

    # ---- chunk keys ------------------------------------------------------------------

    def apply_ops(self, msg: Mapping[str, Any]) -> bool:
        """Apply a BatchedKVOperationMsg; False if the worker is not registered."""
        worker = self.get(msg["instance_id"], msg["worker_id"])
        if worker is None:
            return False
        location = msg["location"]
        keys = worker.kv.setdefault(location, set())
        ghosts = worker.ghosts.setdefault(location, set())
        for op in msg["operations"]:
            if op["op_type"] == "admit":
                keys.add(op["key"])
                ghosts.discard(op["key"])
            elif op["key"] in keys:
                keys.discard(op["key"])
                if self.stale:
                    ghosts.add(op["key"])
            last = worker.last_seq.get(location)
            if last is not None and op["seq_num"] != last + 1:
                self.seq_discontinuities += 1
            worker.last_seq[location] = op["seq_num"]
        return True

    def set_stale(self, stale: bool) -> None:
        """Turn the stale fault on or off; off forgets every ghost key."""
        self.stale = stale
        if not stale:
            for worker in self.workers():
                worker.ghosts.clear()

    def lookup(self, tokens: Sequence[int]) -> dict[str, tuple[str, int]]:
        """layout_info: instance_id -> (location, prefix end) as the real prefix walk."""
        layout: dict[str, tuple[str, int]] = {}
        for end, key in chunk_spans(tokens, self.chunk_size, partial=True):
            hit = self._find(key)
            if hit is None:
                break
            layout[hit[0]] = (hit[1], end)
        return layout

    def _find(self, key: int) -> tuple[str, str] | None:
        for instance_id, workers in self.instances.items():
            for worker in workers.values():
                location = worker.find(key, self.stale)
                if location is not None:
                    return instance_id, location
        return None

    def forget(self, instance_id: str, keys: Iterable[int]) -> int:
        """Drop `keys` from every worker of the instance (the mock's /evict); count dropped."""
        wanted = set(keys)
        dropped: set[int] = set()
        for worker in self.workers(instance_id):
            for store in (*worker.kv.values(), *worker.ghosts.values()):
                dropped |= store & wanted
                store -= wanted
        return len(dropped)

    def key_stats(self) -> dict[str, Any]:
        instances = [
            {"instance_id": iid, "key_count": sum(w.key_count() for w in ws.values()),
             "worker_count": len(ws)}
            for iid, ws in self.instances.items()
        ]  # fmt: skip
        return {
            "total_key_count": sum(i["key_count"] for i in instances),
            "total_instance_count": len(instances),
            "total_worker_count": sum(i["worker_count"] for i in instances),
            "instances": instances,
        }
