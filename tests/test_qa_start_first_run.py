"""First start of `bot serve` on a cold voice cache (a fresh checkout's `make run`): the worker goes ready
once the prompts of a call's first seconds are rendered and renders the policy's other prompts afterwards,
in the background; a Ctrl-C during start-up stops the bot at once and cleanly.

No timing assertions: the order of log lines and exit states tell what happened."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.runtime import Engine
from engine.types import SpeechStyle
from engine.voice import EspeakVoice, Voice
from tests.helpers.bot import open_policy, place_call
from tests.helpers.server import ROOT, BotServer, free_port

pytestmark = pytest.mark.slow


def _events(text: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict):
            out.append(ev)
    return out


def _index(events: list[dict[str, object]], name: str) -> int:
    return next((i for i, e in enumerate(events) if e.get("event") == name), -1)


async def _wait_log(server: BotServer, event: str, timeout_s: float) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = _events(server.logs())
        if _index(events, event) >= 0:
            return events
        if server.proc is not None and server.proc.poll() is not None:
            break
        await asyncio.sleep(0.2)
    raise AssertionError(f"no {event} in the log:\n{server.logs()[-4000:]}")


async def test_cold_start_goes_ready_before_rendering_every_prompt(redis_url: str, tmp_path: Path) -> None:
    from tests.helpers.server import isolated_redis_url

    # a data dir of its own: no rendered prompt on disk, as on a fresh checkout
    env = {"BOT_POLICY": str(open_policy(tmp_path / "p.yaml")), "TWILIO_AUTH_TOKEN": "", "BOT_NO_INPUT_S": "60"}
    server = BotServer(isolated_redis_url(redis_url), tmp_path, env)
    assert not (tmp_path / "data" / "voice-cache").exists()
    server.start(timeout_s=300)
    try:
        # a call is answered (greeting heard) while the other prompts may still be rendering
        caller = await place_call(server.url, token="")
        assert await caller.wait_bot_quiet(quiet_s=0.3, timeout_s=60)
        await caller.hangup()
        await caller.close()
        events = await _wait_log(server, "prompts_prerendered", timeout_s=600)
        ready, done = _index(events, "worker_ready"), _index(events, "prompts_prerendered")
        assert 0 <= ready < done, "the worker must go ready before the policy's prompts are all rendered"
        summary = events[done]
        # on a cold cache the background really rendered prompts, all of them after the worker went ready
        assert summary["background"] is True and isinstance(summary["rendered"], int) and summary["rendered"] > 0
        assert summary["rendered"] <= summary["prompts"]  # type: ignore[operator]
        assert "prerender_rest_failed" not in server.logs() and "Traceback" not in server.logs()
    finally:
        rc = server.stop()
    assert rc == 0, server.logs()[-3000:]
    assert "Traceback" not in server.logs()


def _redis_refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


@pytest.mark.parametrize("interrupt_after", ["engine loaded", "voice loaded"])
async def test_ctrl_c_during_start_up_stops_the_bot(tmp_path: Path, interrupt_after: str) -> None:
    rport = free_port()
    env = {"BOT_EMBEDDED_REDIS_PORT": str(rport), "BOT_POLICY": str(open_policy(tmp_path / "p.yaml")),
           "TWILIO_AUTH_TOKEN": ""}
    server = BotServer("", tmp_path, env, flush_db=False)  # embedded Redis, cold voice cache
    log = open(server.log_path, "ab")
    server.proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve"], cwd=ROOT, env=server.env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        # the Ctrl-C lands during start-up: a cold cache's first prompts still take seconds to render
        await _wait_log(server, interrupt_after, timeout_s=180)
        server.proc.send_signal(signal.SIGINT)
        rc = await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 120)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        log.close()
    text = server.logs()
    events = _events(text)
    assert rc in (0, 130), text[-3000:]
    assert "Traceback" not in text and "Aborted" not in text, text[-3000:]
    assert _index(events, "worker_ready") < 0, "the signal was held until start-up ended"
    assert 0 <= _index(events, "startup_aborted") < _index(events, "embedded_redis_stopped"), text[-3000:]
    assert _redis_refuses(rport)


async def test_background_prerender_stays_out_of_the_speak_queue() -> None:
    """Pre-rendering after ready runs on the idle renderer: nothing a caller waits for queues behind it."""
    engine = Engine(None, Voice(EspeakVoice(), cache_dir=None))
    try:
        texts = ["Thanks for waiting.", "Your balance is due on Friday."]
        assert await engine.prerender(texts, background=True) == 2
        assert engine.stats()["speak"]["items"] == 0  # never in the callers' speak queue
        assert all(engine.voice.cached(t, SpeechStyle(), memory_only=True) is not None for t in texts)
        assert await engine.prerender(texts, background=True) == 0  # cached: nothing to do
        # a bad prompt is skipped (logged, counted), the rest still rendered
        assert await engine.prerender(["", "One more prompt."], background=True) == 1
    finally:
        await engine.close()


async def test_cancelled_voice_waiter_leaves_the_voice_loading() -> None:
    """A start-up stopped while waiting for the voice must not cancel the load (ready would raise then)."""
    from concurrent.futures import Future

    pending: Future = Future()
    engine = Engine(None, pending)
    waiter = asyncio.ensure_future(engine.wait_ready())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not pending.cancelled()
    pending.set_result(Voice(EspeakVoice(), cache_dir=None))
    assert engine.ready
    await engine.wait_ready()
    await engine.close()


async def test_terminal_ctrl_c_drains_every_worker(tmp_path: Path) -> None:
    """Ctrl-C in a terminal signals the whole foreground process group. The workers used to get it twice
    (terminal + supervisor's forward), took the second as "force" and skipped the drain and the flush."""
    import os
    import shutil

    import httpx

    from ops.load.spawn import SHARED_VOICE_CACHE
    from tests.helpers.bot import wait_outcome

    rport = free_port()
    env = {"BOT_EMBEDDED_REDIS_PORT": str(rport), "BOT_POLICY": str(open_policy(tmp_path / "p.yaml")),
           "TWILIO_AUTH_TOKEN": "", "BOT_SHUTDOWN_GRACE_S": "2", "BOT_NO_INPUT_S": "60"}
    server = BotServer("", tmp_path, env, workers=2, flush_db=False)
    if SHARED_VOICE_CACHE.exists():  # rendered prompts: a quick start
        shutil.copytree(SHARED_VOICE_CACHE, tmp_path / "data" / "voice-cache", dirs_exist_ok=True)
    log = open(server.log_path, "ab")
    # a session of its own stands in for the terminal's foreground process group
    server.proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve", "--workers", "2"], cwd=ROOT,
                                   env=server.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while server.logs().count('"worker_ready"') < 2:
            assert server.proc.poll() is None and time.monotonic() < deadline, server.logs()[-3000:]
            await asyncio.sleep(0.5)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{server.url}/readyz", timeout=5)).status_code == 200
        caller = await place_call(server.url, token="")
        assert await caller.wait_bot_quiet(quiet_s=0.3, timeout_s=30)
        os.killpg(server.proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        rc = await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 120)
        await caller.close()
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
        log.close()
    text = server.logs()
    assert rc == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert text.count('"worker_stopped"') == 2, text[-3000:]  # both lifespans shut down (drain + flush)
    assert _redis_refuses(rport)
    # the live call was ended by the drain and written down before the embedded Redis stopped
    data = tmp_path / "data" / "redis"
    check = RedisCheck(data)
    try:
        got = await wait_outcome(check.url, caller.call_sid, 5)
    finally:
        check.stop()
    assert got["record"].get("status") == "ended" and got["record"].get("outcome") == "shutdown", got["record"]


class RedisCheck:
    """The embedded Redis's data (AOF) reopened after the bot stopped, to read what it flushed."""

    def __init__(self, data_dir: Path) -> None:
        from ops.load.spawn import RedisProc

        self.proc = RedisProc(data_dir).start()
        self.url = self.proc.url

    def stop(self) -> None:
        self.proc.stop()
