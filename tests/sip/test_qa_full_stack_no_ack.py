"""QA, full stack: `bot serve` answers a SIP INVITE whose ACK never arrives. The call must be recorded as a
failed setup (outcome error:no_ack, counted in voicebot_calls_total and voicebot_errors_total), not as a
caller who went silent: no no_input events, no no_input / abandoned outcome."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from ops.load.spawn import free_port_both
from telephony.sip.message import make_response, parse_message
from tests.helpers.bot import open_policy, wait_outcome
from tests.helpers.server import BotServer, isolated_redis_url, metric_value

from .test_server import RawUdp

pytestmark = [pytest.mark.slow]


async def test_bot_serve_invite_never_acked_is_a_setup_failure(redis_url: str, tmp_path: Path) -> None:
    sip_port = free_port_both()
    # no-input 1.5 s: the old behaviour (greeting, two reprompts, goodbye) ends the call long before Timer H
    env = {"BOT_POLICY": str(open_policy(tmp_path / "policy.yaml")), "BOT_NO_INPUT_S": "1.5",
           "BOT_SIP_ENABLED": "1", "BOT_SIP_PORT": str(sip_port), "BOT_RTP_TIMEOUT_S": "5"}
    (tmp_path / "bot").mkdir()
    server = BotServer(isolated_redis_url(redis_url), tmp_path / "bot", env)
    server.env["BOT_DATA_DIR"] = str(tmp_path.parent / "shared-data")
    await asyncio.get_running_loop().run_in_executor(None, server.start, 240.0)  # a loaded box starts slowly
    raw = RawUdp()
    loop = asyncio.get_running_loop()
    call_id = f"qa-no-ack-{uuid.uuid4().hex[:8]}"
    sdp = (b"v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           b"m=audio 4004 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n")
    m = ""
    try:
        invite = raw.request("INVITE", sip_port, f"Content-Type: application/sdp\r\n"
                             f"Contact: <sip:raw@127.0.0.1:{raw.port}>\r\n", sdp, call_id=call_id)
        raw.sock.sendto(invite, ("127.0.0.1", sip_port))
        bye = None
        deadline = loop.time() + 45  # Timer H: 32 s after the 200
        while loop.time() < deadline and bye is None:
            try:
                msg = parse_message(await asyncio.wait_for(loop.sock_recv(raw.sock, 65536), deadline - loop.time()))
            except asyncio.TimeoutError:
                break
            if msg.method == "BYE":
                bye = msg
                raw.sock.sendto(make_response(msg, 200).encode(), ("127.0.0.1", sip_port))
        assert bye is not None, server.logs()[-3000:]
        got = await wait_outcome(server.redis_url, call_id, timeout_s=15)
        m = server.metrics()
    finally:
        raw.close()
        server.stop()
    assert got["record"].get("outcome") == "error:no_ack", (got["record"], server.logs()[-3000:])
    assert not [e for e in got["events"] if e["type"] == "no_input"], got["events"]
    assert "voicebot_" in m, (m[:300], server.logs()[-4000:])  # /metrics itself must work
    assert metric_value(m, "voicebot_calls_total", {"transport": "sip", "outcome": "error:no_ack"}) == 1
    assert metric_value(m, "voicebot_errors_total", {"component": "sip", "kind": "no_ack"}) == 1
    assert "call_setup_failed" in server.logs()
