"""The embedded redis-server of `make run`, and how the CLI finds it (its port is a free one, chosen at start)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from bot.redis_embedded import EmbeddedRedis, cli_redis_url, running_url


def _cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | {"BOT_DATA_DIR": str(data_dir)}
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], env=env, capture_output=True, text=True, timeout=60)


def test_cli_finds_the_running_embedded_redis(tmp_path: Path) -> None:
    assert running_url(tmp_path) is None  # no bot has run here
    er = EmbeddedRedis(tmp_path)
    url = er.start()
    try:
        assert running_url(tmp_path) == url
        assert (tmp_path / "redis" / "url").read_text().strip() == url
        live = _cli("calls", "live", data_dir=tmp_path)
        assert live.returncode == 0, live.stderr
        assert json.loads(live.stdout) == []
        missing = _cli("calls", "show", "CAnope", data_dir=tmp_path)
        assert missing.returncode == 1 and "no call CAnope" in missing.stderr  # it reached Redis and looked
    finally:
        er.stop()
    assert running_url(tmp_path) is None
    assert not (tmp_path / "redis" / "url").exists()
    gone = _cli("calls", "live", data_dir=tmp_path)
    assert gone.returncode == 2 and "no bot with embedded Redis is running under" in gone.stderr


def test_a_stale_url_file_is_ignored_and_explicit_urls_win(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "url").write_text("redis://127.0.0.1:1/0\n")  # a killed bot's: nothing listens
    assert running_url(tmp_path) is None
    (tmp_path / "redis" / "url").write_text("not a url")
    assert running_url(tmp_path) is None
    monkeypatch.setenv("BOT_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert cli_redis_url() == ""
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:6379/0")
    assert cli_redis_url() == "redis://elsewhere:6379/0"
    assert cli_redis_url("redis://given:1/0") == "redis://given:1/0"


def test_calls_cli_with_an_unreachable_or_bad_redis_url_says_so(tmp_path: Path) -> None:
    """An operator's typo in --redis-url: one clear line and exit 3, never a traceback."""
    for cmd in (("calls", "live"), ("calls", "show", "CAx")):
        for url, why in (("redis://127.0.0.1:1/0", "Connect"), ("bogus://x", "unsupported REDIS_URL scheme")):
            p = _cli(*cmd, "--redis-url", url, data_dir=tmp_path)
            assert p.returncode == 3, (cmd, url, p.stderr)
            assert p.stderr.startswith(f"error: cannot read Redis at {url}") and why in p.stderr
            assert "Traceback" not in p.stderr


def test_a_killed_bot_leaves_no_redis_server_and_two_never_share_an_aof(tmp_path: Path) -> None:
    """`bot serve` SIGKILLed (OOM killer, kill -9) used to leave its embedded redis-server running; the next
    start then ran a second redis-server appending to the same AOF files. Now the server goes with the bot,
    and a second server on a data dir whose server still runs is refused."""
    import signal
    import time

    code = ("import sys, time; from pathlib import Path; from bot.redis_embedded import EmbeddedRedis; "
            "print(EmbeddedRedis(Path(sys.argv[1])).start(), flush=True); time.sleep(60)")
    bot = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        url = ""
        while not url.startswith("redis://"):  # skip log lines
            url = bot.stdout.readline().strip()  # type: ignore[union-attr]
        assert running_url(tmp_path) == url
        second = EmbeddedRedis(tmp_path)
        try:
            second.start(timeout_s=5)
            raise AssertionError("a second redis-server started on the same AOF")
        except RuntimeError as exc:
            assert "already running" in str(exc) and second.proc is None
        bot.send_signal(signal.SIGKILL)
        bot.wait(10)
        deadline = time.monotonic() + 10
        while running_url(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running_url(tmp_path) is None  # the redis-server went with its bot
    finally:
        bot.kill()
        bot.wait(10)
    er = EmbeddedRedis(tmp_path)
    er.start()  # and the next bot starts normally on the same data dir
    er.stop()


def test_data_left_by_the_embedded_redis_is_flagged_once_redis_url_is_set(tmp_path: Path, monkeypatch) -> None:
    """First `make run` (embedded Redis: calls and published policy versions in its AOF), then REDIS_URL set:
    that data silently stopped counting (the console's published policy seemed rolled back to the file's)."""
    import redis

    from bot.config import load_settings
    from bot.serve import unused_embedded_data

    monkeypatch.setenv("BOT_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("REDIS_URL", raising=False)
    er = EmbeddedRedis(tmp_path)
    url = er.start()
    try:
        redis.Redis.from_url(url).set("{policy}:current", "7")
        assert unused_embedded_data(load_settings()) is None  # embedded in use: nothing to say
    finally:
        er.stop()
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    assert unused_embedded_data(load_settings()) == tmp_path / "redis"
    monkeypatch.setenv("BOT_DATA_DIR", str(tmp_path / "fresh"))
    assert unused_embedded_data(load_settings()) is None  # never ran embedded here
