"""`bot serve` as a subprocess on free ports with the test Redis, ready when /readyz says so."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
_db = itertools.count(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def isolated_redis_url(redis_url: str) -> str:
    """A fresh logical DB per server so policy seeding and call keys never leak between tests.
    DBs 1-7 (0: other fixtures, 8-15: the admin tests)."""
    base = redis_url.rsplit("/", 1)[0]
    return f"{base}/{1 + next(_db) % 7}"


class BotServer:
    def __init__(self, redis_url: str, tmp: Path, env: dict[str, str] | None = None, workers: int = 1,
                 flush_db: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.redis_url = redis_url
        self.tmp = tmp
        self.workers = workers
        self.flush_db = flush_db
        self.log_path = tmp / f"bot-{self.port}.log"
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "BOT_HTTP_PORT": str(self.port),
            "BOT_HTTP_HOST": "127.0.0.1",
            "BOT_SIP_ENABLED": "0",
            "BOT_DATA_DIR": str(tmp / "data"),
            "BOT_LOG_LEVEL": "INFO",
            "BOT_SHUTDOWN_GRACE_S": "5",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 90.0) -> "BotServer":
        if self.flush_db:
            import redis

            redis.Redis.from_url(self.redis_url).flushdb()
        self._log = open(self.log_path, "wb")
        args = [sys.executable, "-m", "bot.cli", "serve"] + (["--workers", str(self.workers)] if self.workers > 1 else [])
        self.proc = subprocess.Popen(["nice", "-n", "10", *args], cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bot serve exited {self.proc.returncode}:\n{self.logs()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"bot serve not ready in {timeout_s}s:\n{self.logs()[-4000:]}")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "BotServer":
        return self.start()

    def __exit__(self, *_a: Any) -> None:
        self.stop()


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
