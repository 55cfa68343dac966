"""One 20 ms media clock for every call in the process.

A task per call means N timers waking up at unrelated moments, each paying scheduler overhead;
one loop that walks all sessions per tick does the same work with a single wakeup and keeps every
call's packets on the same absolute, monotonic deadline grid (no drift: deadline = t0 + k*20 ms).
If the loop was stalled, missed ticks are caught up (bounded) so RTP timestamps stay truthful.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from ops.logs import get_logger
from ops.metrics import ERRORS

TICK_S = 0.020
MAX_CATCHUP_TICKS = 5  # beyond 100 ms behind, skip ahead instead of bursting

log = get_logger("telephony.sip.clock")


class Ticking(Protocol):
    def tick(self, now: float, late: bool) -> None: ...


class MediaClock:
    def __init__(self) -> None:
        self._sessions: set[Ticking] = set()
        self._task: asyncio.Task[None] | None = None
        self.ticks = 0
        self.late_ticks = 0
        self.skipped_ticks = 0
        self.tick_cost_s = 0.0  # cumulative time spent inside ticks (for the benchmark)
        self.max_lag_s = 0.0  # worst wake-up delay past a deadline (event-loop stalls show here)
        self.lag_events: list[tuple[float, float]] = []  # (monotonic time, lag) of ticks > 1 frame late

    def add(self, s: Ticking) -> None:
        self._sessions.add(s)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sip-media-clock")

    def discard(self, s: Ticking) -> None:
        self._sessions.discard(s)

    def __len__(self) -> int:
        return len(self._sessions)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        t0 = time.monotonic()
        k = 0
        while self._sessions:
            k += 1
            deadline = t0 + k * TICK_S
            delay = deadline - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            lag = now - deadline
            self.max_lag_s = max(self.max_lag_s, lag)
            if lag > TICK_S and len(self.lag_events) < 1000:
                self.lag_events.append((now, lag))
            behind = int(lag / TICK_S)
            if behind > MAX_CATCHUP_TICKS:
                self.skipped_ticks += behind - MAX_CATCHUP_TICKS
                k += behind - MAX_CATCHUP_TICKS
                behind = MAX_CATCHUP_TICKS
            for i in range(behind + 1):
                late = i < behind
                self._tick_all(now, late)
                k += 1 if i < behind else 0

    def _tick_all(self, now: float, late: bool) -> None:
        self.ticks += 1
        if late:
            self.late_ticks += 1
        start = time.perf_counter()
        for s in list(self._sessions):
            try:
                s.tick(now, late)
            except Exception as exc:  # one broken session must not stop every other call's audio
                ERRORS.labels("rtp", "tick_failed").inc()
                log.error("tick_failed", error=repr(exc))
                self._sessions.discard(s)
        self.tick_cost_s += time.perf_counter() - start
