"""Load-balancing policies: choose one endpoint among eligible candidates.

A policy sees only eligible, not-yet-tried endpoints. `cache_aware` lives in
`gateway.cache_aware` (it scores cache hints against load).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from gateway.config import ClusterConfig
from gateway.context import RequestContext
from gateway.endpoints import Endpoint


class Policy(Protocol):
    name: str

    def pick(self, candidates: Sequence[Endpoint], ctx: RequestContext) -> Endpoint:
        """Choose one of `candidates` (never empty)."""
        ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Endpoint], ctx: RequestContext) -> Endpoint:
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen


class LeastInflight:
    """Fewest in-flight requests; ties rotate so equal endpoints share the load."""

    name = "least_inflight"

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: Sequence[Endpoint], ctx: RequestContext) -> Endpoint:
        low = min(e.inflight for e in candidates)
        tied = [e for e in candidates if e.inflight == low]
        self._turn += 1
        return tied[self._turn % len(tied)]


class RandomChoice:
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Endpoint], ctx: RequestContext) -> Endpoint:
        return self._rng.choice(list(candidates))


def affinity_key(ctx: RequestContext) -> str:
    """What consistent hashing keys on: the session header, else the prompt's leading text."""
    session = ctx.log_fields.get("session_id")
    if isinstance(session, str):
        return session
    prompt = ctx.prompt
    if prompt is None:
        return ctx.path
    if prompt.kind == "chat" and prompt.messages:
        first = prompt.messages[0].get("content")
        return f"{prompt.model}|{first if isinstance(first, str) else repr(first)[:512]}"
    head = prompt.first_prompt
    return f"{prompt.model}|{head[:512] if isinstance(head, str) else head[:128] if head else ''}"


class ConsistentHash:
    """Rendezvous (highest-random-weight) hashing: a key keeps its endpoint while
    that endpoint is eligible, and only its keys move when it leaves."""

    name = "consistent_hash"

    def pick(self, candidates: Sequence[Endpoint], ctx: RequestContext) -> Endpoint:
        key = affinity_key(ctx).encode()

        def weight(ep: Endpoint) -> bytes:
            return hashlib.blake2b(key + b"|" + ep.id.encode(), digest_size=8).digest()

        return max(candidates, key=weight)


def make_policy(config: ClusterConfig) -> Policy:
    factories: dict[str, Callable[[], Policy]] = {
        "round_robin": RoundRobin,
        "least_inflight": LeastInflight,
        "random": RandomChoice,
        "consistent_hash": ConsistentHash,
    }
    if config.lb_policy == "cache_aware":
        from gateway.cache_aware import CacheAwarePolicy

        policy: Policy = CacheAwarePolicy(config.cache_aware)
        return policy
    return factories[config.lb_policy]()
