"""The MLX engine thread in-process (seeded tiny model): a dying engine fails its waiting
requests, and the waiting bound counts only requests beyond the free batch slots."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import pytest

from kvtok.chat_tokens import ChatTokenizer
from mlxd.engine import Engine
from mlxd.engine_types import EngineClosed, EngineConfig, Event, GenParams, GenRequest, QueueFull
from mlxd.metrics import DaemonMetrics


def test_requests_waiting_when_the_engine_thread_dies_get_an_error(tiny_model_dir: Path) -> None:
    """An exception escaping the engine loop used to end the thread silently: every queued
    request then waited forever."""
    tok = ChatTokenizer.from_dir(tiny_model_dir)
    engine = Engine(EngineConfig(tiny_model_dir, max_running=1), tok, DaemonMetrics("t"))
    engine.start()
    assert engine.ready.wait(60) and engine.alive
    events: dict[str, queue.SimpleQueue[Event]] = {"a": queue.SimpleQueue(), "b": queue.SimpleQueue()}
    reqs = {name: GenRequest([5, 6, 7], GenParams(max_tokens=5000, ignore_eos=True), q.put)
            for name, q in events.items()}
    engine.submit(reqs["a"])
    assert events["a"].get(timeout=30).kind == "token"  # a runs; b will wait for its slot
    engine.submit(reqs["b"])

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("MLX is gone")

    def kill(e: Engine) -> None:
        e._bg.next = broken  # the next step fails, and so does making a new batch
        e._rt.new_batch_generator = broken

    engine.call(kill).result(10)
    try:
        for name in ("a", "b"):
            kinds = []
            while not kinds or kinds[-1] == "token":
                kinds.append(events[name].get(timeout=10).kind)
            assert kinds[-1] == "error", name
        with pytest.raises(EngineClosed):
            engine.submit(GenRequest([5], GenParams(max_tokens=1), lambda e: None))
        assert not engine.alive and engine.load_error and "MLX is gone" in engine.load_error
    finally:
        engine.stop()


def test_max_waiting_counts_only_requests_beyond_the_free_batch_slots(tiny_model_dir: Path) -> None:
    """`--max-waiting 0` used to reject every request, even on an idle daemon: a request
    counted as waiting until the engine thread picked it up, free slots or not."""
    tok = ChatTokenizer.from_dir(tiny_model_dir)
    engine = Engine(EngineConfig(tiny_model_dir, max_running=2, max_waiting=0), tok, DaemonMetrics("t"))
    engine.start()
    assert engine.ready.wait(60) and engine.alive
    events: queue.SimpleQueue[Event] = queue.SimpleQueue()
    try:
        burst = [GenRequest([5, 6, 7 + i], GenParams(max_tokens=5000, ignore_eos=True), events.put)
                 for i in range(2)]
        for req in burst:  # both at once, before the engine thread has seen either
            engine.submit(req)
        seen = 0
        while seen < 2:
            seen += events.get(timeout=30).kind == "token"
        with pytest.raises(QueueFull):  # both slots busy, no waiting room
            engine.submit(GenRequest([9], GenParams(max_tokens=1), events.put))
        for req in burst:
            engine.cancel(req)
    finally:
        engine.stop()
