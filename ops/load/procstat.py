"""CPU and RSS of processes (the bot's workers), from psutil when installed, else /proc."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class ProcSample:
    pid: int
    cpu_s: float  # user + system CPU seconds since start
    rss_bytes: int


def sample(pid: int) -> ProcSample | None:
    try:
        import psutil  # type: ignore[import-not-found]

        p = psutil.Process(pid)
        t = p.cpu_times()
        return ProcSample(pid, t.user + t.system, p.memory_info().rss)
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the process is gone
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # comm may contain spaces
        utime, stime, rss_pages = int(fields[11]), int(fields[12]), int(fields[21])
        return ProcSample(pid, (utime + stime) / _TICK, rss_pages * _PAGE)
    except (OSError, ValueError, IndexError):
        return None


def children(pid: int) -> list[int]:
    """Direct and indirect children of pid (the workers of a `bot serve --workers N` supervisor)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def bot_pids(root_pid: int) -> list[int]:
    """The Python processes serving calls under root_pid (itself, or its worker children)."""
    cands = [root_pid, *children(root_pid)]
    pids = []
    for p in cands:
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "bot.cli" in cmd or "bot serve" in cmd or cmd.rstrip().endswith(" serve"):
            if "redis-server" not in cmd and not cmd.startswith("nice "):
                pids.append(p)
    workers = [p for p in pids if "--worker-child" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    return workers or pids


class CpuMeter:
    """CPU utilisation (cores) and RSS per pid between successive polls."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self._last: dict[int, tuple[float, float]] = {}

    def poll(self) -> dict[int, tuple[float, int]]:
        now = time.monotonic()
        out: dict[int, tuple[float, int]] = {}
        for pid in self.pids:
            s = sample(pid)
            if s is None:
                continue
            prev = self._last.get(pid)
            self._last[pid] = (now, s.cpu_s)
            cores = 0.0 if prev is None or now <= prev[0] else (s.cpu_s - prev[1]) / (now - prev[0])
            out[pid] = (round(cores, 3), s.rss_bytes)
        return out
