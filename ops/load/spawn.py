"""Start `bot serve` (and, for chaos, a redis-server) as local subprocesses on free ports, for the
load and chaos harnesses (`bot load --spawn`, `bot chaos`)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
# pre-rendered prompts are shared by every spawned bot: rendering them costs minutes of CPU
SHARED_VOICE_CACHE = Path(os.environ.get("BOT_OPS_VOICE_CACHE", str(ROOT / "var" / "ops-voice-cache")))


# Ports for spawned servers come from below the kernel's ephemeral range (Linux: 32768-60999) and below
# the default RTP range (20000-30000). A port that bind(0) hands out is an ephemeral one, which any outgoing
# connection (a Redis client, an HTTP request) may take as its local port before the server binds it: seen
# in CI as `bot serve` failing to bind its SIP port ("address already in use") and the test dialling
# whoever held it.
PORT_RANGE = (10000, 19999)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nothing is bound to now, outside the ranges the kernel and our RTP hand out."""
    rng = random.SystemRandom()
    for _ in range(200):
        p = rng.randint(*PORT_RANGE)
        try:
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("127.0.0.1", p))
            return p
        except OSError:
            continue
    raise RuntimeError(f"no free port in {PORT_RANGE}")


def free_port_both() -> int:
    """A port free for TCP and UDP (SIP listens on both)."""
    for _ in range(50):
        p = free_port()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", p))
            return p
        except OSError:
            continue
    raise RuntimeError("no free TCP+UDP port")


class RedisProc:
    """A real redis-server with AOF (everysec) in `data_dir`: restartable and stallable."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.dir = data_dir
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> "RedisProc":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not installed")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                                      "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not open port {self.port}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


class BotProcess:
    """`bot serve [--workers N]` on free ports; ready when /readyz answers 200."""

    def __init__(self, log_dir: Path, redis_url: str = "", workers: int = 1, sip: bool = False,
                 env: dict[str, str] | None = None, nice: int = 10, share_voice_cache: bool = True) -> None:
        self.port = free_port()
        self.sip_port = free_port_both() if sip else 0
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.log_path = log_dir / f"bot-{self.port}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        data = log_dir / "data"  # per process: an embedded redis-server keeps its AOF here
        data.mkdir(parents=True, exist_ok=True)
        if share_voice_cache:
            SHARED_VOICE_CACHE.mkdir(parents=True, exist_ok=True)
            if not (data / "voice-cache").exists():
                (data / "voice-cache").symlink_to(SHARED_VOICE_CACHE, target_is_directory=True)
        self.env = {**os.environ, "BOT_HTTP_PORT": str(self.port), "BOT_HTTP_HOST": "127.0.0.1",
                    "BOT_SIP_ENABLED": "1" if sip else "0", "BOT_SIP_PORT": str(self.sip_port or 5060),
                    "BOT_DATA_DIR": str(data),
                    "BOT_SHUTDOWN_GRACE_S": "5", "PYTHONUNBUFFERED": "1", **(env or {})}
        if redis_url:
            self.env["REDIS_URL"] = redis_url
        else:
            self.env.pop("REDIS_URL", None)
            if "BOT_EMBEDDED_REDIS_PORT" not in (env or {}):
                self.env["BOT_EMBEDDED_REDIS_PORT"] = str(free_port())
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.nice = nice
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self, timeout_s: float = 300.0) -> "BotProcess":
        self._log = open(self.log_path, "ab")
        args = [sys.executable, "-m", "bot.cli", "serve"] + (["--workers", str(self.workers)] if self.workers > 1 else [])
        if self.nice:
            args = ["nice", "-n", str(self.nice), *args]
        self.proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bot serve exited {self.proc.returncode} ({self.log_path}):\n{self.logs()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    if self.workers > 1:
                        self.wait_workers_ready(deadline)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"bot serve not ready in {timeout_s}s ({self.log_path}):\n{self.logs()[-4000:]}")

    def wait_workers_ready(self, deadline: float) -> None:
        """With several workers, /readyz may come from the first one up: wait for all to log ready."""
        while time.monotonic() < deadline:
            if self.logs().count("worker_ready") >= self.workers:
                return
            time.sleep(0.2)

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def __enter__(self) -> "BotProcess":
        return self.start()

    def __exit__(self, *_a: Any) -> None:
        self.stop()

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
        if self._log is not None:
            self._log.close()
        return self.proc.returncode or 0
