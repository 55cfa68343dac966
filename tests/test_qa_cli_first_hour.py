"""A newcomer's first hour, as the README tells it: scripts/setup.sh says clearly what is missing, `bot serve`
refuses any bad setting in one line before starting anything, tells a person on a terminal how to call it once
ready (and that printed command works), `bot call` with no bot says to start one, and Ctrl-C is no traceback."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.helpers.bot import open_policy
from tests.helpers.server import free_port

ROOT = Path(__file__).resolve().parents[1]


def _bot(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


# ---- scripts/setup.sh: what is missing, said before the long apt/pip steps ----

def _setup(tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (tmp / "scripts").mkdir(exist_ok=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp / "scripts" / "setup.sh")
    (tmp / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    return subprocess.run(["bash", str(tmp / "scripts" / "setup.sh")], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


def test_setup_names_a_missing_or_too_old_python(tmp_path: Path) -> None:
    r = _setup(tmp_path, {"PYTHON": "/no/such/python3"})
    assert r.returncode == 1 and "setup: error: no '/no/such/python3'" in r.stderr and "3.11" in r.stderr
    old = tmp_path / "python3.9"  # an interpreter that reports itself as 3.9 (Debian 11's)
    old.write_text("#!/bin/sh\ncase \"$2\" in *platform*) echo 3.9.2;; *) exit 1;; esac\n")
    old.chmod(0o755)
    r = _setup(tmp_path, {"PYTHON": str(old)})
    assert r.returncode == 1 and "is Python 3.9.2; the project needs >= 3.11" in r.stderr, r.stderr
    assert not (tmp_path / ".venv").exists()  # refused before anything was made


def test_setup_off_debian_lists_the_packages_to_install(tmp_path: Path) -> None:
    """No apt-get/dpkg (another distribution): the packages to install by hand, not 'command not found'."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname"):
        os.symlink(shutil.which(tool), bin_dir / tool)  # type: ignore[arg-type]
    r = _setup(tmp_path, {"PATH": str(bin_dir), "PYTHON": sys.executable})
    assert r.returncode == 1, r.stderr
    assert "no apt-get/dpkg here" in r.stderr and "redis-server" in r.stderr and "baresip" in r.stderr


# ---- bot serve: every setting checked before anything starts ----

@pytest.mark.parametrize(("name", "value", "says"), [
    ("BOT_LOG_LEVEL", "verbose", "expected one of debug, info"),
    ("BOT_ENGINE_BACKEND", "gpu", "expected one of onnx, torch"),  # used to abort the process (C++ terminate)
    ("BOT_VAD_THRESHOLD", "half", "expected a number"),  # used to fail deep in start-up with a traceback
    ("BOT_MAX_CALL_S", "0", ">= 1"),
    ("BOT_SIP_ENABLED", "maybe", "expected 1 or 0"),  # used to mean "on"
    ("BOT_RTP_PORT_MAX", "100", "BOT_RTP_PORT_MIN=20000 is above BOT_RTP_PORT_MAX=100"),
    ("BOT_POLICY", "/no/such/policy.yaml", "not a readable file"),  # used to start with the default policy
    ("BOT_SIP_TLS_PORT", "5061", "needs BOT_SIP_TLS_CERT and BOT_SIP_TLS_KEY"),  # TLS without a certificate
    ("BOT_SIP_DNS_SERVERS", "dns.example", "is not IP[:PORT]"),  # a name cannot locate names
    ("BOT_SIP_SRTP", "yes", "expected one of off, optional, required"),
])
def test_serve_refuses_a_bad_setting_before_starting(tmp_path: Path, name: str, value: str, says: str) -> None:
    data = tmp_path / "data"
    r = _bot("serve", env={name: value, "BOT_DATA_DIR": str(data), "REDIS_URL": "", "BOT_SIP_ENABLED": "0",
                           **({name: value} if name == "BOT_SIP_ENABLED" else {}),
                           "BOT_HTTP_PORT": str(free_port())})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("{")]  # the rest: JSON log events
    assert len(lines) == 1 and lines[0].startswith("bot serve: error: "), r.stderr[-1000:]
    assert f"{name}=" in lines[0] and says in lines[0], lines
    assert not (data / "redis").exists()  # nothing started


def test_serve_refuses_a_data_dir_it_cannot_use(tmp_path: Path) -> None:
    afile = tmp_path / "not-a-dir"
    afile.write_text("x")
    for where, says in ((afile, "not a directory"), (afile / "sub", "cannot create it")):
        r = _bot("serve", env={"BOT_DATA_DIR": str(where), "REDIS_URL": "", "BOT_SIP_ENABLED": "0"})
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"BOT_DATA_DIR='{where}': {says}" in r.stderr


def test_a_bad_engine_threads_value_does_not_break_every_command(tmp_path: Path) -> None:
    """BOT_ENGINE_THREADS feeds a default of `bot engine bench`'s flags: `int('abc')` while the parser was built
    made every `bot` command (even `bot calls`) end in a traceback."""
    r = _bot("calls", "live", env={"BOT_ENGINE_THREADS": "abc", "BOT_DATA_DIR": str(tmp_path), "REDIS_URL": ""})
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert "BOT_ENGINE_THREADS='abc': expected an integer" in r.stderr


def test_validate_environment_accepts_defaults_and_documented_forms(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.config import _CHOICES, _FLAGS, _NUMBERS, ConfigError, validate_environment

    for name in [*_NUMBERS, *_CHOICES, *_FLAGS, "BOT_POLICY", "BOT_ADMIN_TOKENS_FILE", "BOT_ENGINE_MODEL_DIR"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BOT_DATA_DIR", str(tmp_path / "new" / "dir"))
    assert validate_environment().data_dir == tmp_path / "new" / "dir"  # made, as the bot would
    for name, value in (("BOT_LOG_LEVEL", "WARNING"), ("BOT_SIP_ENABLED", "Off"), ("BOT_ENGINE_FAULT", "understand"),
                        ("BOT_NO_INPUT_S", "1.5"), ("BOT_VAD_GATE_DBFS", "-45"), ("BOT_ENGINE_BACKEND", "Triton"),
                        ("BOT_NO_INPUT_S", ""), ("BOT_POLICY", str(ROOT / "policies" / "default.yaml"))):
        monkeypatch.setenv(name, value)
        validate_environment()
    monkeypatch.setenv("BOT_SIP_REGISTRAR", "sip:pbx.example.com:5080;transport=tcp")
    with pytest.raises(ConfigError, match="BOT_SIP_REGISTER_USER"):
        validate_environment()  # a registrar without the account to register
    monkeypatch.setenv("BOT_SIP_REGISTER_USER", "bot")
    validate_environment()
    monkeypatch.setenv("BOT_SIP_REGISTRAR", "sip:pbx.example.com;transport=ws")
    with pytest.raises(ConfigError, match="only udp, tcp and tls"):
        validate_environment()


# ---- bot call with nothing listening ----

def test_call_with_no_bot_running_says_to_start_one(tmp_path: Path) -> None:
    wav = tmp_path / "hi.wav"
    sf.write(wav, np.zeros(1600, dtype=np.int16), 8000, subtype="PCM_16")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    r = _bot("call", "--url", url, str(wav), env={"REDIS_URL": "", "BOT_DATA_DIR": str(tmp_path)})
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
    assert f"error: call failed: no bot answers at {url}" in r.stderr and "make run" in r.stderr


# ---- Ctrl-C ----

def test_ctrl_c_during_a_call_exits_130_without_a_traceback(tmp_path: Path) -> None:
    """A bot that accepts the connection and never answers: the user gives up with Ctrl-C."""
    wav = tmp_path / "hi.wav"
    sf.write(wav, np.zeros(1600, dtype=np.int16), 8000, subtype="PCM_16")
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        srv.settimeout(120)
        port = srv.getsockname()[1]
        p = subprocess.Popen([sys.executable, "-m", "bot.cli", "call", "--url", f"http://127.0.0.1:{port}", str(wav)],
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": "",
                                            "BOT_DATA_DIR": str(tmp_path)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            conn, _ = srv.accept()  # the CLI is now inside the call, waiting for the webhook's answer
            with conn:
                p.send_signal(signal.SIGINT)
                out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "bot call: interrupted" in err and out == ""


# ---- make run's bot: on a terminal it says how to call it, and that works ----

def _read_until(fd: int, pattern: str, timeout_s: float, buf: list[str]) -> re.Match[str] | None:
    """Read the terminal into buf until `pattern` matches what it shows (its \\r\\n line ends as \\n)."""
    def found() -> re.Match[str] | None:
        return re.search(pattern, "".join(buf).replace("\r\n", "\n"), re.S)

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (m := found()) is not None:
            return m
        r, _, _ = select.select([fd], [], [], 1.0)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal: it exited
                return found()
            if not chunk:
                return found()
            buf.append(chunk.decode("utf-8", "replace"))
    return None


@pytest.mark.slow
def test_serve_on_a_terminal_says_how_to_call_it_and_that_works(tmp_path: Path) -> None:
    from ops.load.spawn import SHARED_VOICE_CACHE

    data = tmp_path / "data"
    if SHARED_VOICE_CACHE.exists():  # prompts rendered by earlier runs: start-up in seconds, not minutes
        shutil.copytree(SHARED_VOICE_CACHE, data / "voice-cache")
    http, sip = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": "", "BOT_DATA_DIR": str(data),
           "BOT_HTTP_PORT": str(http), "BOT_SIP_PORT": str(sip), "BOT_HTTP_HOST": "127.0.0.1",
           "BOT_POLICY": str(open_policy(tmp_path / "policy.yaml")), "TWILIO_AUTH_TOKEN": "", "BOT_ADMIN_TOKEN": "",
           "BOT_ADMIN_TOKENS_FILE": ""}
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=slave, start_new_session=True)
    os.close(slave)
    buf: list[str] = []
    try:
        m = _read_until(master, r"bot serve: ready on (\S+)\n(.*?/metrics)", 400, buf)
        assert m is not None, "".join(buf)[-3000:]
        base, how = m.group(1).strip(), m.group(2)
        assert base == f"http://127.0.0.1:{http}"
        assert f"bot call --url {base} " in how and f"sip:bot@127.0.0.1:{sip}" in how
        assert f"{base}/admin (token: cat {data / 'admin-token'})" in how and "/twilio/voice" in how
        # the printed test call, as a newcomer pastes it (with a WAV of their own)
        wav = tmp_path / "pay.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), "I want to pay my bill"], check=True, timeout=60)
        cmd = re.search(r"test call \(Twilio protocol\): \.venv/bin/bot (call .*?)\s*\n", how)
        assert cmd is not None, how
        args = cmd.group(1).replace("YOUR.wav", str(wav)).replace("/tmp/bot.wav", str(tmp_path / "bot.wav")).split()
        r = _bot(*args, env={"BOT_DATA_DIR": str(data), "REDIS_URL": ""}, timeout=120)
        assert r.returncode == 0 and '"intent": "pay_bill"' in r.stdout, r.stderr[-2000:]
        assert (tmp_path / "bot.wav").stat().st_size > 1000
    finally:
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C on the terminal reaches the whole foreground group
        try:
            p.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        _read_until(master, r"$^", 2, buf)
        os.close(master)
    assert p.returncode == 0, "".join(buf)[-3000:]
    assert "Traceback" not in "".join(buf)


# ---- the embedded Redis: missing, or already used by another bot ----

def test_serve_without_redis_url_or_redis_server_says_what_to_do(tmp_path: Path) -> None:
    """`docker run voicebot` alone: the image has no redis-server (compose gives REDIS_URL)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    r = _bot("serve", env={"PATH": str(bin_dir), "REDIS_URL": "", "BOT_DATA_DIR": str(tmp_path / "data"),
                           "BOT_SIP_ENABLED": "0"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "REDIS_URL is empty and there is no redis-server on PATH" in r.stderr


def test_a_second_serve_on_the_same_data_dir_is_one_line(tmp_path: Path) -> None:
    """A second `make run` in the same checkout while the first runs: its embedded Redis holds var/redis."""
    from bot.redis_embedded import EmbeddedRedis

    er = EmbeddedRedis(tmp_path)
    url = er.start()
    try:
        r = _bot("serve", env={"REDIS_URL": "", "BOT_DATA_DIR": str(tmp_path), "BOT_SIP_ENABLED": "0",
                               "BOT_HTTP_PORT": str(free_port())})
    finally:
        er.stop()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"bot serve: error: an embedded redis-server is already running on {url}" in r.stderr


# ---- arguments: one line and exit 2 ----

@pytest.mark.parametrize("args", [
    ["engine", "wise", "--run", "/no/such/run", "--out", "OUT"],
    ["engine", "export", "--run", "/no/such/run", "--out", "OUT"],
    ["engine", "import-model", "/no/such/model", "--out", "OUT"],
    ["engine", "synth", "--train", "-5", "--out", "OUT"],  # used to start minutes of synthesis anyway
    ["engine", "make-asterisk-eval", "OUT", "-n", "0"],  # used to write an empty evaluation set
    ["calls", "-n", "0"],  # used to list one call
    ["policy", "tune", "EVAL", "--limit", "-1"],
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    args = [str(tmp_path / "out") if a == "OUT" else str(tmp_path) if a == "EVAL" else a for a in args]
    r = _bot(*args, env={"BOT_DATA_DIR": str(tmp_path), "REDIS_URL": ""})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (tmp_path / "out").exists()
