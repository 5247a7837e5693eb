"""Seeded, deterministic workloads for `kvgate bench routing`.

A workload is a list of sessions. A session is a list of requests sent one after
another by one client (a multi-turn conversation resends its growing history
each turn); sessions are taken in order by `concurrency` clients. Every request
knows its prefix group (the load generator sends it as the `x-kvbench-group`
header, which only the oracle reads) and the number of its prompt tokens that an
ideal router with unbounded caches could serve from cache (`ceiling_tokens`: the
longest block-aligned prefix shared with an earlier request, less the one token
vLLM always recomputes). The same `(name, scale, seed)` gives the same requests.

| workload | shape |
|---|---|
| burst | 6 shared prefixes x 6 questions, the questions of a prefix back to back, 4 clients |
| multi-tenant | 16 tenants, ~1500-word system prompts, tenants drawn uniformly |
| skewed | as multi-tenant, tenants drawn Zipf(1.1) |
| multi-turn | chat conversations (/v1/chat/completions) whose history is resent each turn |
| no-sharing | unique prompts: the control, nothing to reuse |
| heterogeneous | multi-tenant on 2 fast + 2 slow (10x lower prefill rate) backends |
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.sim_vllm.protocol import chat_prompt_ids
from testbed.sim_vllm.tokenizer import HashTokenizer, SimTokenizer

BLOCK_SIZE = 16  # sim-vllm's default --block-size
_CORPUS = Path(__file__).resolve().parents[1] / "mlxd" / "corpus.txt"
VOCAB = tuple(sorted(set(re.findall(r"[a-z]+", _CORPUS.read_text().lower()))))
GROUP_HEADER = "x-kvbench-group"


@dataclass(frozen=True, slots=True)
class Request:
    group: str
    path: str  # /v1/completions or /v1/chat/completions
    body: dict[str, Any]  # without model/stream/max_tokens: the client adds those
    prompt_tokens: int = 0
    ceiling_tokens: int = 0


@dataclass(slots=True)
class Workload:
    name: str
    sessions: list[list[Request]]
    concurrency: int
    slow_backends: int = 0  # of the fleet, how many run at 1/10 of the prefill rate
    description: str = ""
    requests: list[Request] = field(default_factory=list)  # flattened, in send order

    @property
    def ceiling(self) -> float:
        """Best achievable hit ratio: sum of ceiling tokens / sum of prompt tokens."""
        prompt = sum(r.prompt_tokens for r in self.requests)
        return sum(r.ceiling_tokens for r in self.requests) / prompt if prompt else 0.0


def _words(rng: random.Random, tag: str, n: int) -> str:
    """`n` words drawn from the tiny model's corpus vocabulary (`tag` names the part of
    the prompt; it does not change the draw's distribution): about one token per word
    with the hash tokenizer, ~1.2 with the tiny model's byte-level BPE."""
    return "".join(f" {rng.choice(VOCAB)}" for _ in range(n))


def _completion(group: str, prompt: str) -> Request:
    return Request(group, "/v1/completions", {"prompt": prompt})


def _chat(group: str, messages: list[dict[str, str]]) -> Request:
    return Request(group, "/v1/chat/completions", {"messages": messages})


def burst(scale: float, seed: int) -> Workload:
    rng = random.Random(seed)
    questions = max(2, round(6 * scale))
    sessions = []
    for g in range(6):
        prefix = f"Shared document {g}:" + _words(rng, "d", 1500)
        sessions += [[_completion(f"doc-{g}", prefix + f" Question {q}:" + _words(rng, "q", 30))]
                     for q in range(questions)]
    return Workload("burst", sessions, concurrency=4,
                    description=f"6 shared ~1500-word prefixes x {questions} questions, each prefix's "
                                "questions back to back, 4 clients")


def _tenant_prompts(rng: random.Random, tenants: int) -> list[str]:
    return [f"System prompt of tenant {t}:" + _words(rng, "w", 1500) for t in range(tenants)]


def _tenant_requests(name: str, scale: float, seed: int, pick: Callable[[random.Random], int],
                     slow: int = 0, what: str = "uniform") -> Workload:
    rng = random.Random(seed)
    prompts = _tenant_prompts(rng, 16)
    count = max(8, round(400 * scale))
    sessions = []
    for i in range(count):
        t = pick(rng)
        sessions.append([_completion(f"tenant-{t}", prompts[t] + f" Question {i}:" + _words(rng, "q", 30))])
    fleet = " on 2 fast + 2 slow backends" if slow else ""
    return Workload(name, sessions, concurrency=8, slow_backends=slow,
                    description=f"{count} requests, 16 tenants with ~1500-word system prompts, {what}{fleet}, "
                                "8 clients")


def multi_tenant(scale: float, seed: int) -> Workload:
    return _tenant_requests("multi-tenant", scale, seed, lambda rng: rng.randrange(16))


def _zipf_picker(n: int, s: float) -> Callable[[random.Random], int]:
    weights = [1 / (k + 1) ** s for k in range(n)]
    return lambda rng: rng.choices(range(n), weights)[0]


def skewed(scale: float, seed: int) -> Workload:
    return _tenant_requests("skewed", scale, seed, _zipf_picker(16, 1.1), what="Zipf(1.1) tenants")


def heterogeneous(scale: float, seed: int) -> Workload:
    return _tenant_requests("heterogeneous", scale, seed, lambda rng: rng.randrange(16), slow=2)


def multi_turn(scale: float, seed: int) -> Workload:
    rng = random.Random(seed)
    conversations, turns = max(4, round(32 * scale)), 5
    systems = [f"Assistant persona {p}:" + _words(rng, "p", 600) for p in range(4)]
    sessions = []
    for c in range(conversations):
        messages = [{"role": "system", "content": systems[c % 4]}]
        session = []
        for turn in range(turns):
            messages = [*messages, {"role": "user", "content": f"Turn {turn}:" + _words(rng, "u", 120)}]
            session.append(_chat(f"conv-{c}", list(messages)))
            messages = [*messages, {"role": "assistant", "content": _words(rng, "a", 60).strip()}]
        sessions.append(session)
    return Workload("multi-turn", sessions, concurrency=8,
                    description=f"{conversations} chat conversations x {turns} turns (history resent each turn, "
                                "4 ~600-word personas), 8 clients")


def no_sharing(scale: float, seed: int) -> Workload:
    rng = random.Random(seed)
    count = max(8, round(200 * scale))
    sessions = [[_completion(f"unique-{i}", f"Unique request {i}:" + _words(rng, "n", 1500))] for i in range(count)]
    return Workload("no-sharing", sessions, concurrency=8,
                    description=f"{count} unique ~1500-word prompts (control: nothing to reuse), 8 clients")


WORKLOADS: dict[str, Callable[[float, int], Workload]] = {
    "burst": burst,
    "multi-tenant": multi_tenant,
    "skewed": skewed,
    "multi-turn": multi_turn,
    "no-sharing": no_sharing,
    "heterogeneous": heterogeneous,
}


def _prompt_ids(tokenizer: SimTokenizer, request: Request) -> list[int]:
    if "messages" in request.body:
        return chat_prompt_ids(request.body, tokenizer)
    return tokenizer.encode(request.body["prompt"])


def _block_hashes(ids: Sequence[int]) -> list[int]:
    hashes, parent = [], 0
    for start in range(0, len(ids) - BLOCK_SIZE + 1, BLOCK_SIZE):
        parent = hash((parent, tuple(ids[start:start + BLOCK_SIZE])))
        hashes.append(parent)
    return hashes


def with_ceilings(workload: Workload, tokenizer: SimTokenizer | None = None) -> Workload:
    """Fill in prompt and ceiling token counts, in the order the requests are sent, with
    the backends' tokenizer (the hash tokenizer when none is given)."""
    tokenizer = tokenizer or HashTokenizer()
    seen: set[int] = set()
    sessions = []
    for session in workload.sessions:
        done = []
        for req in session:
            ids = _prompt_ids(tokenizer, req)
            hashes = _block_hashes(ids)
            hit = next((i for i, h in enumerate(hashes) if h not in seen), len(hashes))
            hit = min(hit, (len(ids) - 1) // BLOCK_SIZE)
            seen.update(hashes)
            done.append(Request(req.group, req.path, req.body, len(ids), hit * BLOCK_SIZE))
        sessions.append(done)
    workload.sessions = sessions
    workload.requests = [r for s in sessions for r in s]
    return workload


def build(name: str, scale: float = 1.0, seed: int = 7, tokenizer: SimTokenizer | None = None) -> Workload:
    """The named workload at `scale` (request counts scale; prompt shapes do not)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return with_ceilings(WORKLOADS[name](scale, seed), tokenizer)
