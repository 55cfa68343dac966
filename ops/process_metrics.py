"""A worker's own CPU time and resident memory as gauges (voicebot_worker_cpu_seconds,
voicebot_worker_resident_memory_bytes), sampled every few seconds: the standard process_* metrics
vanish in Prometheus multiprocess mode, and on-call needs to see which worker is hot or growing."""

from __future__ import annotations

import asyncio
import os
import time

from ops import metrics

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """Current (not peak) resident set size, from /proc; None where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def sample() -> None:
    metrics.WORKER_CPU.set(time.process_time())
    rss = resident_bytes()
    if rss is not None:
        metrics.WORKER_RSS.set(rss)


async def run(interval_s: float = 5.0) -> None:
    """Sample until cancelled (a few microseconds per sample)."""
    while True:
        sample()
        await asyncio.sleep(interval_s)
