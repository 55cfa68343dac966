"""A worker's own CPU time, resident memory, open file descriptors, threads and asyncio tasks as gauges
(voicebot_worker_*), sampled every few seconds: the standard process_* metrics vanish in Prometheus
multiprocess mode, and on-call needs to see which worker is hot or growing. Every figure but CPU must
come back to its idle level once the calls are gone; one that keeps climbing with the call count is a leak."""

from __future__ import annotations

import asyncio
import os
import threading
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


def open_fds() -> int | None:
    """Open file descriptors (sockets included), from /proc; None where there is no /proc."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def os_threads() -> int:
    """OS threads (native ones of ONNX Runtime, Redis, ... included), from /proc; else Python's threads."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return threading.active_count()


def asyncio_tasks() -> int | None:
    """Tasks not yet done in the running event loop; None when called outside one."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return None


def sample() -> None:
    metrics.WORKER_CPU.set(time.process_time())
    rss = resident_bytes()
    if rss is not None:
        metrics.WORKER_RSS.set(rss)
    fds = open_fds()
    if fds is not None:
        metrics.WORKER_OPEN_FDS.set(fds)
    metrics.WORKER_THREADS.set(os_threads())
    tasks = asyncio_tasks()
    if tasks is not None:
        metrics.WORKER_TASKS.set(tasks)


async def run(interval_s: float = 5.0) -> None:
    """Sample until cancelled (well under a millisecond per sample at hundreds of calls)."""
    while True:
        sample()
        await asyncio.sleep(interval_s)
