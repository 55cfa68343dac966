"""The shutdown grace running out on a live SIP call (baresip calling a real `bot serve`, SIGTERM): the caller is
told, then REFERred to the policy's system-error queue (a SipServer playing the human agent) with the call's
context, and the record says `shutdown` with the transfer (reason `shutdown`), instead of a BYE out of silence."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import numpy as np
import pytest
import soundfile as sf

from bot.conversation import SHUTDOWN_TRANSFER_TEXT
from ops.load.spawn import free_port_both
from telephony.sip.config import SipSettings
from telephony.sip.server import SipServer
from tests.helpers.audio import silence
from tests.helpers.bot import open_policy, wait_outcome
from tests.helpers.server import BotServer, isolated_redis_url
from tests.sip.baresip import BARESIP, Baresip
from tests.sip.conftest import RecordingHandler

pytestmark = [pytest.mark.slow, pytest.mark.skipif(BARESIP is None, reason="baresip not installed")]
GRACE_S = 4.0


@pytest.fixture
async def agent() -> AsyncIterator[tuple[RecordingHandler, SipServer]]:
    handler = RecordingHandler(np.zeros(800, dtype=np.int16))
    srv = SipServer("127.0.0.1", 0, handler, SipSettings(allow="127.0.0.0/8", user="", password="",
                                                          rtp_timeout_s=30.0, ring_s=0.0, queue_uris={},
                                                          transfer_fallback=""))
    await srv.start()
    yield handler, srv
    await srv.stop()


async def _sip_call_id(server: BotServer, timeout: float) -> str:
    import redis

    r = redis.Redis.from_url(server.redis_url, decode_responses=True)
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for key in r.scan_iter("call:*"):
            if key.count(":") == 1 and r.hget(key, "transport") == "sip":
                return key.split(":", 1)[1]
        await asyncio.sleep(0.2)
    raise TimeoutError(f"no SIP call record in Redis; log tail:\n{server.logs()[-3000:]}")


async def test_sip_call_at_grace_end_is_told_and_referred_to_a_person(
        redis_url: str, tmp_path: Path, agent: tuple[RecordingHandler, Any]) -> None:
    handler, agent_srv = agent
    sip_port = free_port_both()
    env = {
        "BOT_POLICY": str(open_policy(tmp_path / "policy.yaml")), "BOT_NO_INPUT_S": "60",
        "BOT_SIP_ENABLED": "1", "BOT_SIP_PORT": str(sip_port), "BOT_TRANSFER_WAIT_S": "1",
        "BOT_SIP_QUEUE_URIS": f"general=sip:general@127.0.0.1:{agent_srv.port}",
        "BOT_SHUTDOWN_GRACE_S": str(GRACE_S), "TWILIO_AUTH_TOKEN": "",
    }
    (tmp_path / "bot").mkdir()
    server = BotServer(isolated_redis_url(redis_url), tmp_path / "bot", env)
    server.env["BOT_DATA_DIR"] = str(tmp_path.parent / "shared-data")  # voice cache shared by test servers
    quiet_wav = tmp_path / "quiet.wav"
    sf.write(str(quiet_wav), silence(60000), 8000, subtype="PCM_16")  # baresip's aufile ends the call at EOF
    await asyncio.get_running_loop().run_in_executor(None, server.start, 240.0)
    assert httpx.get(f"{server.url}/readyz", timeout=5).json()["sip"] == "listening"
    ua = Baresip(tmp_path / "ua", quiet_wav)
    try:
        await ua.start()
        await ua.send(f"/dial sip:bot@127.0.0.1:{sip_port}")
        await ua.wait_for(r"Call established", 15)
        call_id = await _sip_call_id(server, 15)
        await asyncio.sleep(4.0)  # the greeting plays out; the caller says nothing
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(handler.new_call.wait(), GRACE_S + 20)  # baresip followed our REFER to the agent
        rc = await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 40)
        assert rc == 0, server.logs()[-3000:]
        got = await wait_outcome(server.redis_url, call_id, timeout_s=10)
    finally:
        await ua.stop()
        server.stop()
    rec = got["record"]
    assert rec["status"] == "ended" and rec["outcome"] == "shutdown", (rec, server.logs()[-3000:])
    said = [e for e in got["events"] if e["type"] == "prompt_heard" and e["kind"] == "shutdown"]
    assert len(said) == 1 and said[0]["text"] == SHUTDOWN_TRANSFER_TEXT and not said[0]["interrupted"], said
    transfer = [e for e in got["events"] if e["type"] == "transfer"]
    assert len(transfer) == 1 and transfer[0]["ok"] and transfer[0]["target"] == "general", transfer
    assert transfer[0]["reason"] == "shutdown" and transfer[0]["context"]["reason"] == "shutdown"
    assert transfer[0]["context"]["transport"] == "sip" and transfer[0]["context"]["call_id"] == call_id
    assert handler.calls[-1]["bridge"].info.called == "general"
