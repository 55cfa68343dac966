"""Scale-out for SIP: baresip -> Kamailio (ops/kamailio/kamailio.cfg) -> two `bot serve` SIP workers
sharing one Redis. Two calls through the dispatcher land on different workers (round-robin), and
the caller hears the bot on both."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis as redis_sync
import soundfile as sf

from ops.load.spawn import ROOT, BotProcess, free_port_both
from tests.helpers.audio import silence, synth
from tests.sip.baresip import BARESIP, Baresip, voiced_fraction

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(BARESIP is None or shutil.which("kamailio") is None, reason="needs baresip + kamailio")]


def _kamailio(tmp: Path, port: int, workers: list[int]) -> subprocess.Popen[bytes]:
    lst = tmp / "dispatcher.list"
    lst.write_text("".join(f"1 sip:127.0.0.1:{p} 0 0 weight=50;duid=w{i}\n" for i, p in enumerate(workers)))
    run = tmp / "run"
    run.mkdir()
    log = open(tmp / "kamailio.log", "wb")
    return subprocess.Popen(["kamailio", "-DD", "-E", "-f", str(ROOT / "ops/kamailio/kamailio.cfg"), "-Y", str(run),
                             "-A", f'DISPATCHER_LIST="{lst}"', "-A", "LISTEN_IP=127.0.0.1", "-A", f"LISTEN_PORT={port}"],
                            stdout=log, stderr=subprocess.STDOUT)


async def test_two_workers_behind_kamailio_take_baresip_calls(redis_url: str, tmp_path: Path) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/10"
    r = redis_sync.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    from ops.chaos.harness import open_hours_policy

    policy = open_hours_policy(tmp_path / "policy.yaml")
    env = {"BOT_POLICY": str(policy), "BOT_NO_INPUT_S": "30"}
    loop = asyncio.get_running_loop()
    bots = [BotProcess(tmp_path / f"bot{i}", redis_url=url, sip=True, env=env) for i in range(2)]
    await asyncio.gather(*(loop.run_in_executor(None, b.start) for b in bots))
    kport = free_port_both()
    kam = _kamailio(tmp_path, kport, [b.sip_port for b in bots])
    wav = tmp_path / "caller.wav"
    sf.write(str(wav), __import__("numpy").concatenate([silence(1500), synth("what is my balance"), silence(3000)]),
             8000, subtype="PCM_16")
    uas: list[Baresip] = []
    try:
        await asyncio.sleep(1.5)
        assert kam.poll() is None, (tmp_path / "kamailio.log").read_text()[-3000:]
        for i in range(2):
            ua = Baresip(tmp_path / f"ua{i}", wav)
            await ua.start()
            uas.append(ua)
            await ua.send(f"/dial sip:bot@127.0.0.1:{kport}")
            await ua.wait_for(r"Call established", 20)
        await asyncio.sleep(4.0)  # greeting plays
        for ua in uas:
            await ua.send("/hangup")
        await asyncio.sleep(1.5)
        heard = []
        for ua in uas:
            await ua.stop()
            heard.append(voiced_fraction(ua.recording("dec")))
        assert all(h > 0.05 for h in heard), heard  # the callers heard the bot through the proxy
        deadline = time.monotonic() + 15
        recs: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            ids = r.zrange("calls:recent", 0, -1)
            recs = [r.hgetall(f"call:{cid}") for cid in ids]
            if len(recs) >= 2 and all(x.get("status") == "ended" for x in recs):
                break
            await asyncio.sleep(0.3)
        assert len(recs) == 2 and {x["transport"] for x in recs} == {"sip"}, recs
        assert len({x["worker"] for x in recs}) == 2, f"both calls on one worker: {recs}"  # dispatched round-robin
        assert all(x["status"] == "ended" and x["outcome"] for x in recs), recs
    finally:
        for ua in uas:
            await ua.stop()
        kam.terminate()
        kam.wait(10)
        for b in bots:
            await loop.run_in_executor(None, b.stop)
        r.flushdb()
