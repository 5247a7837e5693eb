"""The MLX engine: one thread owns the model, mlx-lm's BatchGenerator and the prefix cache.

Other threads talk to it only through `submit`, `cancel` and `call` (thread-safe);
results come back through each request's `sink` callback, invoked on the engine
thread (the server's sink hops onto the event loop). Continuous batching: up to
`max_running` requests decode together, new ones join between steps; up to
`max_waiting` more wait, beyond that `submit` raises `QueueFull`.

Prefix reuse: before a request joins the batch, the longest cached prefix of its
prompt (at most len-1 tokens: the last one must be prefilled to get logits) primes
its KV cache, so only the rest is prefilled. A prompt's KV is offered to the cache
once prefilled, and again (with the generated tokens) when the request ends.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvtok.chat_tokens import ChatTokenizer
from mlxd.engine_types import EngineClosed, EngineConfig, Event, GenRequest, QueueFull, Usage
from mlxd.metrics import DaemonMetrics
from mlxd.prefix_cache import PrefixCache
from mlxd.textstream import TextStream

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineClosed", "EngineConfig", "Event", "GenRequest", "QueueFull", "Usage"]


@dataclass
class _Active:
    req: GenRequest
    stream: TextStream
    cached: int
    generated: int = 0
    first_token_at: float | None = None
    uid: int = -1


class Engine:
    """See the module docstring. `start()` loads the model on the engine thread."""

    def __init__(self, cfg: EngineConfig, tokenizer: ChatTokenizer, metrics: DaemonMetrics,
                 chunk_listener: Any | None = None, block_events: Any | None = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.chunk_listener = chunk_listener  # has admit(keys) / evict(keys); thread-safe
        self.block_events = block_events  # mlxd.block_events.BlockEvents; thread-safe
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.cache: PrefixCache | None = None
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._pending: deque[GenRequest] = deque()
        self._active: dict[int, _Active] = {}
        self._by_req: dict[int, _Active] = {}
        self._stopping = False
        self._closed = False  # set (under _lock) when the engine thread stops taking work
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)
        self._rt: Any = None  # MlxRuntime, made on the engine thread
        self._bg: Any = None

    # ---- thread-safe API ---------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.load_error is None

    def start(self) -> None:
        self._thread.start()

    def submit(self, req: GenRequest) -> None:
        """Queue `req`; raises QueueFull when every batch slot is taken and `max_waiting`
        requests already wait, and EngineClosed once the engine thread has stopped."""
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine has stopped")
            # Submitted requests count as waiting until the engine thread takes them, so
            # the free batch slots they are about to fill are room too.
            room = self.cfg.max_waiting + max(0, self.cfg.max_running - len(self._active))
            if self._waiting >= room:
                raise QueueFull(f"{len(self._active)} requests running, {self._waiting} waiting "
                                f"(limits {self.cfg.max_running} and {self.cfg.max_waiting})")
            self._waiting += 1
        self._inbox.put(("submit", req))

    def cancel(self, req: GenRequest) -> None:
        """Stop `req` wherever it is; its sink gets no further events. Idempotent."""
        self._inbox.put(("cancel", req))

    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future[Any]:
        """Run `fn(engine)` on the engine thread between steps (for cache control); the
        future fails with EngineClosed once the engine thread has stopped."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                future.set_exception(EngineClosed("the engine has stopped"))
                return future
            self._inbox.put(("call", fn, future))
        return future

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._inbox.put(("wake",))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load()
        except Exception as exc:  # noqa: BLE001 - reported through /health and the log
            log.exception("model load failed")
            self.load_error = f"{type(exc).__name__}: {exc}"
            self._close(f"model load failed: {self.load_error}")
            return
        finally:
            self.ready.set()
        reason = "server shutting down"
        try:
            self._loop()
        except BaseException as exc:  # the loop survives single bugs; this is the end of it
            log.exception("engine thread failed")
            reason = f"engine stopped: {exc}"
            self.load_error = reason  # /health reports it as it reports a failed load
        finally:
            self._close(reason)

    def _loop(self) -> None:
        while not self._stopping:
            try:
                self._drain_inbox(block=not self._active and not self._pending)
                self._admit()
                if self._active:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one bug
                log.exception("engine loop error")
                self._fail_all(f"engine error: {exc}")

    def _load(self) -> None:
        from mlxd.kv_codec import MlxKVCodec
        from mlxd.mlx_runtime import MlxRuntime

        self._rt = MlxRuntime(self.cfg.model_dir)
        if self._rt.supports_prefix_cache():
            self.cache = PrefixCache(MlxKVCodec(), self.cfg.cache_tokens, self.cfg.cold_cache_tokens,
                                     on_admit=self._report_admit, on_evict=self._report_evict,
                                     block_events=self.block_events)
        else:
            log.warning("model uses non-standard KV caches: prefix reuse disabled")
        self._bg = self._rt.new_batch_generator(self.cfg.max_running, self.cfg.prefill_step)
        self._rt.warm_up(self._bg)

    def _report_admit(self, keys: list[int]) -> None:
        if self.chunk_listener is not None:
            self.chunk_listener.admit(keys)

    def _report_evict(self, keys: list[int]) -> None:
        if self.chunk_listener is not None:
            self.chunk_listener.evict(keys)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                self._handle(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _handle(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind == "submit":
            self._pending.append(item[1])
        elif kind == "cancel":
            self._cancel(item[1])
        elif kind == "call":
            fn, future = item[1], item[2]
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self))
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)

    def _cancel(self, req: GenRequest) -> None:
        if req in self._pending:
            self._pending.remove(req)
            self._dec_waiting()
            return
        act = self._by_req.get(id(req))
        if act is not None:
            self._remove([act])

    def _dec_waiting(self) -> None:
        with self._lock:
            self._waiting -= 1

    def _admit(self) -> None:
        while self._pending and len(self._active) < self.cfg.max_running:
            req = self._pending.popleft()
            self._dec_waiting()
            try:
                self._insert(req)
            except Exception as exc:  # noqa: BLE001 - one bad request must not stop the engine
                log.exception("could not start request")
                req.sink(Event("error", text=f"engine error: {exc}"))

    def _insert(self, req: GenRequest) -> None:
        prompt, match_n, kv = req.prompt, 0, None
        if self.cache is not None and len(prompt) > 1:
            match = self.cache.lookup(prompt, limit=len(prompt) - 1)
            match_n, kv = match.n, match.kv
        uid = self._rt.insert(self._bg, prompt, match_n, kv, req.params, self.cfg.eos_token_ids)
        act = _Active(req, TextStream(self._decode, req.params.stop), cached=match_n, uid=uid)
        self._active[uid] = act
        self._by_req[id(req)] = act
        self.metrics.count(self.metrics.prefix_queries, len(prompt) if self.cache else 0)
        self.metrics.count(self.metrics.prefix_hits, match_n)
        self.metrics.count(self.metrics.prompt_tokens, len(prompt))

    def _decode(self, ids: Any) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _step(self) -> None:
        try:
            prompt_responses, responses = self._bg.next()
        except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
            log.exception("generation step failed")
            self._fail_all(f"engine error: {exc}")
            return
        now = time.perf_counter()
        self._save_prefilled([r.uid for r in prompt_responses if r.end_of_prompt and r.uid in self._active])
        to_remove = []
        for r in responses:
            act = self._active.get(r.uid)
            if act is not None and self._on_token(act, r, now):
                to_remove.append(act)
        if to_remove:
            self._remove(to_remove)

    def _on_token(self, act: _Active, r: Any, now: float) -> bool:
        """Deliver one generated token; returns True if the request must leave the batch."""
        if act.first_token_at is None:
            act.first_token_at = now
            self.metrics.observe_ttft(now - act.req.arrival)
        act.generated += 1
        self.metrics.count(self.metrics.generation_tokens)
        reason = r.finish_reason
        text = act.stream.push(r.token) if reason != "stop" else ""
        if act.stream.stopped:
            reason = "stop"
        if reason is not None:
            text += act.stream.flush()
        if text:
            act.req.sink(Event("token", text=text))
        if reason is None:
            return False
        if r.finish_reason is not None:  # left the batch by itself
            self._forget(act)
            self._save(r.all_tokens, r.prompt_cache)
        self._finish(act, reason, now)
        return r.finish_reason is None

    def _finish(self, act: _Active, reason: str, now: float) -> None:
        usage = Usage(len(act.req.prompt), act.generated, act.cached)
        self.metrics.observe_finished(reason, now - act.req.arrival)
        act.req.sink(Event("done", finish_reason=reason, usage=usage))

    def _forget(self, act: _Active) -> None:
        self._active.pop(act.uid, None)
        self._by_req.pop(id(act.req), None)

    def _remove(self, acts: list[_Active]) -> None:
        """Take requests out of the batch, keeping the KV they computed in the prefix cache."""
        for act in acts:
            self._forget(act)
        for tokens, caches in self._rt.remove(self._bg, [a.uid for a in acts], keep_kv=self.cache is not None):
            self._save(tokens, caches)

    def _save_prefilled(self, uids: list[int]) -> None:
        """Cache prompts as soon as they are prefilled, so requests arriving while these
        still decode reuse them (and the controller hears of them early)."""
        if self.cache is not None and uids:
            for tokens, caches in self._rt.extract(self._bg, uids):
                self._save(tokens, caches)

    def _save(self, tokens: list[int] | None, caches: list[Any] | None) -> None:
        if self.cache is None or not tokens or not caches:
            return
        try:
            self.cache.insert(list(tokens), self._rt.kv_of(caches))
        except Exception:  # noqa: BLE001 - caching is best effort
            log.exception("could not cache a prefix")

    def _fail_all(self, message: str) -> None:
        for act in list(self._active.values()):
            self._forget(act)
            act.req.sink(Event("error", text=message))
        self._bg = self._rt.new_batch_generator(self.cfg.max_running, self.cfg.prefill_step)

    def _close(self, message: str) -> None:
        """The thread is ending: refuse new work, answer every request still queued or
        running with an error and fail pending calls, so nobody waits forever."""
        with self._lock:
            self._closed = True
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item[0] == "submit":
                self._pending.append(item[1])
            elif item[0] == "call" and item[2].set_running_or_notify_cancel():
                item[2].set_exception(EngineClosed(message))
        for req in [a.req for a in self._active.values()] + list(self._pending):
            req.sink(Event("error", text=message, status=503))
        self._active.clear()
        self._by_req.clear()
        self._pending.clear()
