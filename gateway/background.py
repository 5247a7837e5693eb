"""One bounded background queue for fire-and-forget work off the hot path.

`submit()` never blocks: when the queue is full the job is dropped and counted.
`close()` drains what is queued (bounded by a timeout) and stops the workers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("kvgate.background")

Job = Callable[[], Awaitable[object]]


@dataclass(slots=True)
class BackgroundStats:
    submitted: int = 0
    dropped: int = 0
    completed: int = 0
    failed: int = 0


class BackgroundQueue:
    def __init__(self, maxsize: int = 1024, workers: int = 1) -> None:
        self._queue: asyncio.Queue[tuple[str, Job]] = asyncio.Queue(maxsize)
        self._workers_n = workers
        self._workers: list[asyncio.Task[None]] = []
        self.stats = BackgroundStats()

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._run(), name=f"kvgate-bg-{i}") for i in range(self._workers_n)]

    def submit(self, name: str, job: Job) -> bool:
        """Queue `job` (a zero-argument coroutine function); False (and counted) if full."""
        try:
            self._queue.put_nowait((name, job))
        except asyncio.QueueFull:
            self.stats.dropped += 1
            return False
        self.stats.submitted += 1
        return True

    def pending(self) -> int:
        return self._queue.qsize()

    async def _run(self) -> None:
        while True:
            name, job = await self._queue.get()
            try:
                await job()
                self.stats.completed += 1
            except asyncio.CancelledError:
                raise
            except Exception:
                self.stats.failed += 1
                log.warning("background job %s failed", name, exc_info=True)
            finally:
                self._queue.task_done()

    async def close(self, timeout: float = 5.0) -> None:
        """Drain queued jobs (up to `timeout` seconds), then stop the workers."""
        if self._workers:
            try:
                await asyncio.wait_for(self._queue.join(), timeout)
            except TimeoutError:
                log.warning("background queue: %d jobs not drained at shutdown", self._queue.qsize())
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
