"""An embedded, real redis-server for `bot serve` without REDIS_URL: persists under BOT_DATA_DIR
with AOF, listens on loopback only, and is stopped when the bot stops.

While it runs, its URL is in BOT_DATA_DIR/redis/url, so `bot calls` and `bot call` find the bot's Redis
after a plain `make run` (its port is a free one, chosen at start)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ops.logs import get_logger

log = get_logger("bot.redis_embedded")


URL_FILE = "url"


def _redis_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "redis"


def _pong(port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def running_url(data_dir: Path) -> str | None:
    """The URL of the embedded redis-server a bot started under data_dir, if it answers now: a file left by
    a bot that was killed points at nothing, and is ignored."""
    try:
        url = (_redis_dir(data_dir) / URL_FILE).read_text().strip()
        port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    except (OSError, ValueError, IndexError):
        return None
    return url if _pong(port) else None


def die_with_parent() -> None:
    """In a child before exec (Linux): SIGTERM it when the process that started it dies, even by SIGKILL.
    A killed bot leaves no redis-server behind still appending to the AOF (the next bot would start a second
    one on the same files; SIGTERM: redis fsyncs the AOF and exits), and a killed supervisor no worker still
    holding the HTTP port (SIGTERM: the worker drains its calls)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort; start() still refuses a second server on the same dir
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    def __init__(self, data_dir: Path, port: int = 0) -> None:
        self.data_dir = _redis_dir(data_dir)
        self.port = port or _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> str:
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server not found: install it (scripts/setup.sh) or set REDIS_URL")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        other = running_url(self.data_dir.parent)
        deadline = time.monotonic() + 5.0
        while other and time.monotonic() < deadline:  # one whose bot just died shuts down within moments
            time.sleep(0.1)
            other = running_url(self.data_dir.parent)
        if other:
            # two redis-servers appending to one AOF corrupt it (and an AOF rewrite by one loses the
            # other's writes): never start a second one here
            raise RuntimeError(
                f"an embedded redis-server is already running on {other} with {self.data_dir}: another bot uses "
                f"BOT_DATA_DIR={self.data_dir.parent}, or a killed bot left it running; stop it "
                f"(redis-cli -u {other} shutdown) or use another BOT_DATA_DIR")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir.resolve()),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes",
             "--logfile", str((self.data_dir / "redis.log").resolve())],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
            # its own session: a Ctrl-C in the terminal reaches the bot only, which drains its calls into Redis
            # and then stops it (the parent-death signal still covers a killed bot)
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"embedded redis-server exited ({self.proc.returncode}); see {self.data_dir}/redis.log")
            if _pong(self.port):
                (self.data_dir / URL_FILE).write_text(self.url + "\n")
                log.info("embedded_redis_started", port=self.port, dir=str(self.data_dir))
                return self.url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("embedded redis-server did not answer in time")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        url_file = self.data_dir / URL_FILE
        try:
            if url_file.read_text().strip() == self.url:  # another bot may have started here since
                url_file.unlink()
        except OSError:
            pass
        self.proc.terminate()  # SIGTERM: redis fsyncs the AOF and exits
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        log.info("embedded_redis_stopped", port=self.port)


def cli_redis_url(explicit: str | None = None) -> str:
    """For CLI commands that read the bot's Redis: --redis-url, else REDIS_URL, else the embedded server of a
    bot running under BOT_DATA_DIR (default ./var); "" when there is none."""
    from bot.config import load_settings

    if explicit:
        return explicit
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    return running_url(load_settings().data_dir) or ""
