"""`bot serve` as a subprocess on free ports with the test Redis, ready when /readyz says so (ops.load.spawn)."""

from __future__ import annotations

import itertools
from pathlib import Path

from ops.load.spawn import BotProcess, free_port

__all__ = ["BotServer", "free_port", "isolated_redis_url", "metric_value"]

ROOT = Path(__file__).resolve().parents[2]
_db = itertools.count(1)


def isolated_redis_url(redis_url: str) -> str:
    """A fresh logical DB per server so policy seeding and call keys never leak between tests.
    DBs 1-7 (0: other fixtures, 8-15: the admin tests)."""
    base = redis_url.rsplit("/", 1)[0]
    return f"{base}/{1 + next(_db) % 7}"


class BotServer(BotProcess):
    """The ops harness's `bot serve` subprocess, pointed at the test Redis (a fresh logical DB each,
    flushed first), logging at INFO, with its own voice cache (so tests never share rendered prompts)."""

    def __init__(self, redis_url: str, tmp: Path, env: dict[str, str] | None = None, workers: int = 1,
                 flush_db: bool = True) -> None:
        super().__init__(tmp, redis_url=redis_url, workers=workers, env={"BOT_LOG_LEVEL": "INFO", **(env or {})},
                         share_voice_cache=False)
        self.redis_url = redis_url
        self.flush_db = flush_db

    def start(self, timeout_s: float = 180.0) -> "BotServer":  # it renders every prompt: ~95 s on a loaded box
        if self.flush_db:
            import redis

            redis.Redis.from_url(self.redis_url).flushdb()
        super().start(timeout_s)
        return self


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of a metric's samples whose labels include `labels` (multiprocess-safe)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, val = line.rpartition(" ")
        metric, _, lab = head.partition("{")
        if metric != name:
            continue
        if labels and not all(f'{k}="{v}"' in lab for k, v in labels.items()):
            continue
        total += float(val)
    return total
