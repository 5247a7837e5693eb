"""`consistent_hash`: rendezvous (highest-random-weight) hashing on an affinity key.

A key keeps its endpoint while that endpoint is eligible, and only its keys move
when it leaves. The key: the chain's `AFFINITY_KEY` if a filter set one, else the
prompt's leading text (model + first message or first 512 characters).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from filters.keys import AFFINITY_KEY, PROMPT
from gateway.endpoints import Endpoint
from gateway.pickers.base import Choice, Picker
from gateway.pickers.registry import register_picker
from kvkernel.context import RequestContext


def affinity_key(ctx: RequestContext) -> str:
    explicit = ctx.get(AFFINITY_KEY)
    if explicit:
        return explicit
    prompt = ctx.get(PROMPT)
    if prompt is None:
        return ctx.path
    if prompt.kind == "chat" and prompt.messages:
        first = prompt.messages[0].get("content")
        return f"{prompt.model}|{first if isinstance(first, str) else repr(first)[:512]}"
    head = prompt.first_prompt
    return f"{prompt.model}|{head[:512] if isinstance(head, str) else head[:128] if head else ''}"


@register_picker("consistent_hash")
class ConsistentHash(Picker):
    def pick(self, candidates: Sequence[Endpoint], ctx: RequestContext) -> Choice:
        key = affinity_key(ctx).encode()

        def weight(ep: Endpoint) -> bytes:
            return hashlib.blake2b(key + b"|" + ep.id.encode(), digest_size=8).digest()

        return Choice(max(candidates, key=weight))
