"""`bot serve` process behaviour: graceful shutdown (stop accepting, let calls finish within the
grace, end the rest, flush, exit 0), several workers on one inherited listening socket with multiprocess
metrics, and the embedded redis-server used when REDIS_URL is not set."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.bot import call_record, open_policy, place_call, wait_outcome
from tests.helpers.server import BotServer, free_port, isolated_redis_url, metric_value

pytestmark = pytest.mark.slow


def _warm_voice_cache(data_dir: Path) -> None:
    """Start from the ops harness's rendered prompts (same voice, same default prompts): rendering them all
    cold takes minutes on a busy 2-core box, longer than a start-up timeout."""
    import shutil

    from ops.load.spawn import SHARED_VOICE_CACHE

    if SHARED_VOICE_CACHE.exists() and not (data_dir / "voice-cache").exists():
        shutil.copytree(SHARED_VOICE_CACHE, data_dir / "voice-cache")


async def test_graceful_shutdown_drains_calls(redis_url: str, tmp_path: Path,
                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    env = {"BOT_SHUTDOWN_GRACE_S": "4", "BOT_NO_INPUT_S": "60", "BOT_POLICY": str(open_policy(tmp_path / "p.yaml")),
           "BOT_DATA_DIR": str(tmp_path_factory.getbasetemp() / "shared-data"), "TWILIO_AUTH_TOKEN": ""}
    _warm_voice_cache(tmp_path_factory.getbasetemp() / "shared-data")
    server = BotServer(isolated_redis_url(redis_url), tmp_path, env).start()
    try:
        a = await place_call(server.url, token="")
        b = await place_call(server.url, token="")
        await a.wait_bot_quiet(quiet_s=0.3, timeout_s=10)
        assert server.proc is not None
        t_sig = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient() as client:  # no new calls: the listener is closed
            with pytest.raises(httpx.HTTPError):
                await client.post(f"{server.url}/twilio/voice", data={"CallSid": "CAlate"}, timeout=2)
        assert not a.ended and not b.ended  # live calls carry on
        await b.hangup()  # B finishes on its own during the grace
        assert await a.wait_ended(15)  # A outlives the grace: the bot ends it
        ended_after = time.monotonic() - t_sig
        await a.close()
        rc = await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 30)
        assert rc == 0, server.logs()[-3000:]
        assert 3.5 <= ended_after <= 4 + 8 + 3, ended_after  # grace, then BOT_SHUTDOWN_END_S for its ending
        ra = await wait_outcome(server.redis_url, a.call_sid, 5)
        rb = await wait_outcome(server.redis_url, b.call_sid, 5)
        assert ra["record"]["outcome"] == "shutdown" and rb["record"]["outcome"] == "caller_hangup"
    finally:
        server.stop()


async def test_workers_share_port_with_embedded_redis(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    import redis

    rport = free_port()
    data = tmp_path / "data"
    env = {"BOT_EMBEDDED_REDIS_PORT": str(rport), "BOT_POLICY": str(open_policy(tmp_path / "p.yaml")),
           "TWILIO_AUTH_TOKEN": "", "BOT_DATA_DIR": str(data)}
    server = BotServer("", tmp_path, env, workers=2, flush_db=False)
    # the voice cache from other tests makes start-up quick; the embedded Redis lives in `data`
    shared = tmp_path_factory.getbasetemp() / "shared-data" / "voice-cache"
    if shared.exists():
        import shutil

        shutil.copytree(shared, data / "voice-cache")
    _warm_voice_cache(data)
    server.start(timeout_s=300)  # a cold voice cache on a busy 2-core box: prerendering takes minutes
    try:
        workers: set[str] = set()
        for _ in range(60):
            async with httpx.AsyncClient() as client:  # a new connection each time
                workers.add((await client.get(f"{server.url}/healthz")).json()["worker"])
            if len(workers) == 2:
                break
        assert len(workers) == 2, workers
        # both workers must be ready before one /metrics can show both
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            text = server.metrics()
            if all(f'worker="{w}"' in text for w in workers):
                break
            await asyncio.sleep(0.5)
        assert all(f'worker="{w}"' in text for w in workers)  # multiprocess metrics: one view
        c = await place_call(server.url, token="")
        assert await c.wait_bot_quiet(quiet_s=0.3, timeout_s=15)
        await c.hangup()
        url = f"redis://127.0.0.1:{rport}/0"
        got = await wait_outcome(url, c.call_sid)
        assert got["record"]["outcome"] == "caller_hangup" and got["record"]["worker"] in workers
        assert redis.Redis.from_url(url).config_get("appendonly")["appendonly"] == "yes"

        # per-worker CPU/RSS in multiprocess mode; a killed worker's live gauges leave with it
        pids = _worker_pids(server.metrics())
        assert len(pids) == 2, pids
        assert all(cpu > 0 and rss > 20e6 for cpu, rss in pids.values()), pids
        # the worker holding a live call is SIGKILLed: its supervisor closes that call at once (worker_lost,
        # naming the dead process), not 30-45 s later when its heartbeat goes stale
        live = await place_call(server.url, token="")
        assert await live.wait_bot_quiet(quiet_s=0.3, timeout_s=15)
        rec = call_record(url, live.call_sid)["record"]
        victim = int(rec["worker_pid"])
        assert victim in pids and rec["status"] == "active"
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # (Twilio asks what next when the stream drops, and the call comes back on a live worker: see below)
        deadline = time.monotonic() + 25
        ends: list[dict] = []
        while time.monotonic() < deadline and not ends:
            ends = [e for e in call_record(url, live.call_sid)["events"] if e["type"] == "call_ended"]
            await asyncio.sleep(0.1)
        (ended,) = ends
        assert ended["outcome"] == "worker_lost", ended
        assert ended["reaper"].endswith("-supervisor") and ended["worker_pid"] == victim, ended
        assert ended["worker"] == rec["worker"] and time.monotonic() - t_kill < 25
        # ... and the caller was not dropped: a new stream for the same call, on the surviving worker
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline and not live.result.reconnects:
            await asyncio.sleep(0.1)
        assert live.result.reconnects == 1 and not live.ended, live.result.final_twiml
        back = call_record(url, live.call_sid)
        resumed = [e for e in back["events"] if e["type"] == "call_resumed"]
        assert resumed and resumed[0]["worker_pid"] != victim and back["record"]["status"] == "active", back
        await live.hangup()
        assert (await wait_outcome(url, live.call_sid, 25))["record"]["outcome"] == "caller_hangup"
        deadline = time.monotonic() + 120
        now: dict[int, tuple[float, float]] = {}
        while time.monotonic() < deadline:  # the supervisor replaces it; the new worker reports in
            try:
                now = _worker_pids(server.metrics())
            except httpx.TransportError:  # a request the victim accepted as it died is reset
                await asyncio.sleep(0.5)
                continue
            # the replacement's gauges exist (at 0) from import; RSS is set once it serves
            if victim not in now and len(now) == 2 and all(rss > 0 for _, rss in now.values()):
                break
            await asyncio.sleep(0.5)
        assert victim not in now and len(now) == 2 and all(rss > 0 for _, rss in now.values()), (victim, now)
        text = server.metrics()
        assert f'voicebot_redis_up{{pid="{victim}"}}' not in text
        # counted like any reaped call; the one-shot reaper process left no live gauge (a redis_up of 0) behind
        assert metric_value(text, "voicebot_calls_total", {"outcome": "worker_lost"}) == 1, text
        ups = re.findall(r'^voicebot_redis_up\{pid="(\d+)"\} (\S+)', text, re.M)
        assert len(ups) == 2 and all(v == "1.0" for _, v in ups), ups
    finally:
        rc = server.stop()
    assert rc == 0, server.logs()[-3000:]
    assert list((data / "redis").glob("appendonly*"))  # persisted under BOT_DATA_DIR
    with pytest.raises(redis.ConnectionError):  # and stopped with the bot
        redis.Redis(port=rport, socket_connect_timeout=0.5).ping()


def _worker_pids(text: str) -> dict[int, tuple[float, float]]:
    """{pid: (cpu seconds, resident bytes)} from a multiprocess /metrics page."""
    cpu = {int(m[1]): float(m[2]) for m in re.finditer(r'^voicebot_worker_cpu_seconds\{pid="(\d+)"\} (\S+)', text, re.M)}
    rss = {int(m[1]): float(m[2])
           for m in re.finditer(r'^voicebot_worker_resident_memory_bytes\{pid="(\d+)"\} (\S+)', text, re.M)}
    return {pid: (cpu[pid], rss.get(pid, 0.0)) for pid in cpu}
