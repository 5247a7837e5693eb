"""Event-loop lag: how late a periodic wake-up runs (what every request waited extra
while the loop was busy). Sampled every `interval`; the last minute's samples kept."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from aiohttp import web


class LoopLag:
    def __init__(self, interval: float = 0.1, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self.samples: deque[float] = deque(maxlen=max(1, int(window / interval)))

    def record(self, lag: float) -> None:
        self.samples.append(max(0.0, lag))

    def status(self) -> dict[str, float]:
        """The last sample and the window's maximum and mean, in ms."""
        if not self.samples:
            return {"last_ms": 0.0, "max_ms": 0.0, "mean_ms": 0.0}
        return {"last_ms": round(self.samples[-1] * 1000, 3), "max_ms": round(max(self.samples) * 1000, 3),
                "mean_ms": round(sum(self.samples) / len(self.samples) * 1000, 3)}

    async def run(self) -> None:
        while True:
            due = self._clock() + self.interval
            await asyncio.sleep(self.interval)
            self.record(self._clock() - due)


def loop_lag_ctx(lag: LoopLag) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(lag.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx
