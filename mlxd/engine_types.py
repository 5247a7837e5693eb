"""Plain data exchanged with the MLX engine (no MLX import)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


class QueueFull(Exception):
    """The engine's waiting queue is full; answer 429 with Retry-After."""


class EngineClosed(Exception):
    """The engine thread has stopped (shutdown, failed load or a fatal error); answer 503."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine limits. Capacities are in tokens; `cold_cache_tokens` 0 disables the cold tier."""

    model_dir: Path
    eos_token_ids: tuple[int, ...] = ()
    max_running: int = 8
    max_waiting: int = 64
    prefill_step: int = 512
    cache_tokens: int = 32768
    cold_cache_tokens: int = 131072

    def __post_init__(self) -> None:
        for name in ("max_running", "prefill_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_waiting", "cache_tokens", "cold_cache_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class GenParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class Event:
    """`token` (text delta), `done` (finish_reason + usage) or `error` (text = message,
    `status` = the HTTP status it maps to: 500 for a failed generation, 503 when the
    engine stopped under the request)."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    status: int = 500


@dataclass(eq=False)
class GenRequest:
    """One generation; `sink` is called on the engine thread with each Event."""

    prompt: list[int]
    params: GenParams
    sink: Callable[[Event], None]
    arrival: float = field(default_factory=time.perf_counter)
