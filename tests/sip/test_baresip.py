"""The SIP bridge against a real SIP user agent: baresip calls the SipServer.

Each test runs one headless baresip (aufile plays caller speech, sndfile records what it hears) and
checks both directions of media, BYE from each side, CANCEL, hold/resume, RFC 4733 DTMF, TCP, and
REFER to a second SipServer acting as the queue's transfer target.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from telephony.bridge import CallBridge
from telephony.sip.call import SipCall

from .baresip import BARESIP, Baresip, voiced_fraction
from .conftest import RecordingHandler, hang_up_after_prompt, inbound_pcm, wait_until

pytestmark = pytest.mark.skipif(BARESIP is None, reason="baresip not installed")


@pytest.fixture
async def baresip(tmp_path: Path, caller_wav: Path) -> Any:
    peers: list[Baresip] = []

    async def _start(**kw: Any) -> Baresip:
        b = Baresip(tmp_path / f"b{len(peers)}", caller_wav, **kw)
        await b.start()
        peers.append(b)
        return b

    yield _start
    for b in peers:
        await b.stop()


async def _keys_hold_resume(ua: Baresip, rec: dict[str, Any]) -> None:
    """baresip presses 4 2 # (RFC 4733), holds the bot and resumes it: each seen by the call."""
    call: SipCall = rec["bridge"]
    await ua.send("/sndcode 42#")
    await wait_until(lambda: len(rec["dtmf"]) >= 3, 10)
    assert rec["dtmf"][:3] == ["4", "2", "#"]
    await ua.send("/hold")
    await wait_until(lambda: call.media.neg is not None and call.media.neg.direction == "recvonly", 10)
    await ua.send("/resume")
    await wait_until(lambda: call.media.neg is not None and call.media.neg.direction == "sendrecv", 10)


async def test_media_both_ways_dtmf_hold_resume_caller_bye(make_server, sip_settings, prompt_pcm, baresip) -> None:
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    ua = await baresip()
    await ua.send(f"/dial sip:bot@127.0.0.1:{srv.port}")
    await ua.wait_for(r"Call established", 10)
    await asyncio.wait_for(handler.new_call.wait(), 5)
    rec = handler.calls[0]
    call: SipCall = rec["bridge"]
    assert call.info.transport == "sip"
    await wait_until(lambda: "prompt" in rec["marks"], 10)  # MarkIn: the prompt was paced out

    await _keys_hold_resume(ua, rec)
    await asyncio.sleep(0.5)

    await ua.send("/hangup")
    await asyncio.wait_for(handler.call_ended.wait(), 10)
    assert rec["ended"] == "hangup"
    # Caller -> bot: the caller's recorded speech arrived with speech-like energy.
    assert voiced_fraction(inbound_pcm(rec)) > 0.15
    # Bot -> caller: baresip recorded our prompt (real speech), not silence.
    await ua.stop()
    heard = ua.recording("dec")
    assert voiced_fraction(heard) > 0.1, "baresip did not hear the bot's prompt"
    assert call.media.stats["rx_bad"] == 0


async def test_bot_hangs_up_after_prompt(make_server, sip_settings, prompt_pcm, baresip) -> None:
    handler = RecordingHandler(prompt_pcm, after_prompt=hang_up_after_prompt)
    srv = await make_server(handler, sip_settings)
    ua = await baresip()
    await ua.send(f"/dial sip:bot@127.0.0.1:{srv.port}")
    await ua.wait_for(r"Call established", 10)
    await asyncio.wait_for(handler.call_ended.wait(), 15)
    assert handler.calls[0]["ended"] == "completed"
    await ua.wait_for(r"terminated|closed", 10)  # baresip got our BYE


async def test_cancel_before_answer(make_server, sip_settings, prompt_pcm, baresip) -> None:
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, dataclasses.replace(sip_settings, ring_s=5.0))
    ua = await baresip()
    await ua.send(f"/dial sip:bot@127.0.0.1:{srv.port}")
    await ua.wait_for(r"(?i)ringing", 10)
    mark = len(ua.lines)
    await ua.send("/hangup")  # while ringing: baresip sends CANCEL
    await ua.wait_for(r"(?i)terminate|closed|cancel|487", 10, start=mark)
    await asyncio.sleep(5.5)  # past the ring time: the cancelled call must never be answered
    assert handler.calls == [] and not srv.calls and not srv._pending


async def test_tcp_transport(make_server, sip_settings, prompt_pcm, baresip) -> None:
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    ua = await baresip(transport="tcp")
    await ua.send(f"/dial sip:bot@127.0.0.1:{srv.port};transport=tcp")
    await ua.wait_for(r"Call established", 10)
    await asyncio.wait_for(handler.new_call.wait(), 5)
    rec = handler.calls[0]
    assert rec["bridge"].peer.proto == "TCP"
    await wait_until(lambda: len(rec["audio"]) > 50, 10)
    await ua.send("/hangup")
    await asyncio.wait_for(handler.call_ended.wait(), 10)
    assert rec["ended"] == "hangup"


async def test_refer_transfer_to_queue(make_server, sip_settings, prompt_pcm, baresip) -> None:
    """Escalation: the bot REFERs baresip to the billing queue's URI (a second SipServer); baresip dials
    it, NOTIFYs 200, and the bot leaves the call with BYE."""
    agent = RecordingHandler(np.zeros(1600, dtype=np.int16))
    agent_srv = await make_server(agent, sip_settings)

    async def escalate(bridge: CallBridge) -> bool:
        return await bridge.transfer("billing", {"reason": "test"})

    handler = RecordingHandler(prompt_pcm, after_prompt=escalate)
    settings = dataclasses.replace(sip_settings, queue_uris={"billing": f"sip:billing@127.0.0.1:{agent_srv.port}"})
    srv = await make_server(handler, settings)
    ua = await baresip()
    await ua.send(f"/dial sip:bot@127.0.0.1:{srv.port}")
    await ua.wait_for(r"Call established", 10)
    await asyncio.wait_for(agent.new_call.wait(), 20)  # baresip followed the REFER to the agent
    await asyncio.wait_for(handler.call_ended.wait(), 20)
    rec = handler.calls[0]
    await rec["action_task"]
    assert rec["action"] is True
    assert rec["ended"] == "transferred"
    assert agent.calls[0]["bridge"].info.called == "billing"


async def test_digest_auth_with_baresip(make_server, sip_settings, prompt_pcm, baresip) -> None:
    """A real UA answers our 401 challenge (MD5, qop=auth) and gets in; a wrong password does not."""
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, dataclasses.replace(sip_settings, user="trunk", password="s3cret"))
    wrong = await baresip(user="trunk", password="nope")
    await wrong.send(f"/dial sip:bot@127.0.0.1:{srv.port}")
    await wrong.wait_for(r"(?i)401|403|unauthori|terminated|closed", 10)
    await asyncio.sleep(0.5)
    assert handler.calls == []
    ua = await baresip(user="trunk", password="s3cret")
    await ua.send(f"/dial sip:bot@127.0.0.1:{srv.port}")
    await ua.wait_for(r"Call established", 10)
    await asyncio.wait_for(handler.new_call.wait(), 5)
    await ua.send("/hangup")
    await asyncio.wait_for(handler.call_ended.wait(), 10)


async def test_tcp_call_is_carried_on_by_another_process_over_a_new_connection(make_server, sip_settings, prompt_pcm,
                                                                               baresip) -> None:
    """A TCP call whose process died (its connection gone with it) is taken over by a SIP server elsewhere
    (bot/sip_recovery.py): the re-INVITE goes over a new connection to the phone's Contact, baresip takes it,
    hears the new process, and its BYE reaches the new process."""
    from telephony.sip.resume import resume
    from tests.sip.test_resume import _die

    handler_a = RecordingHandler(prompt_pcm)
    a = await make_server(handler_a, sip_settings)
    ua = await baresip(transport="tcp")
    await ua.send(f"/dial sip:bot@127.0.0.1:{a.port};transport=tcp")
    await ua.wait_for(r"Call established", 10)
    await asyncio.wait_for(handler_a.new_call.wait(), 5)
    call_a: SipCall = handler_a.calls[0]["bridge"]
    assert call_a.peer.proto == "TCP"
    await wait_until(lambda: "prompt" in handler_a.calls[0]["marks"], 10)
    snap = json.loads(json.dumps(call_a.resume_state()))
    await _die(a)
    handler_b = RecordingHandler(prompt_pcm)
    b = await make_server(handler_b, sip_settings)
    call, result = await resume(b, snap, leg=2)
    assert result == "resumed" and call is not None and call.peer.proto == "TCP"
    await asyncio.wait_for(handler_b.new_call.wait(), 5)
    rec = handler_b.calls[0]
    await wait_until(lambda: len(rec["audio"]) > 50, 10)  # the phone's audio reaches the new process
    await wait_until(lambda: "prompt" in rec["marks"], 10)  # and the new process's prompt went out to it
    await ua.send("/hangup")
    await asyncio.wait_for(handler_b.call_ended.wait(), 10)
    assert rec["ended"] == "hangup"


async def test_srtp_call_with_baresip_and_its_takeover_rekeyed(make_server, sip_settings, prompt_pcm, baresip) -> None:
    """baresip with SRTP mandatory (SDES, libre's own SRTP, not libsrtp): audio both ways encrypted, DTMF and
    hold/resume on the SRTP stream; then the process dies and another carries the call on under the same key from
    the same rollover counter. baresip 1.0 does not re-key on a re-INVITE: with a new key it could not decrypt one
    packet from the new process (measured before the handover kept the key)."""
    from telephony.sip.resume import resume
    from tests.sip.test_resume import _die

    handler_a = RecordingHandler(prompt_pcm)
    a = await make_server(handler_a, dataclasses.replace(sip_settings, srtp="required"))
    ua = await baresip(mediaenc="srtp-mand")
    await ua.send(f"/dial sip:bot@127.0.0.1:{a.port}")
    await ua.wait_for(r"Call established", 10)
    await asyncio.wait_for(handler_a.new_call.wait(), 5)
    rec = handler_a.calls[0]
    call: SipCall = rec["bridge"]
    assert call.media.srtp is not None and call.media.neg is not None and call.media.neg.proto == "RTP/SAVP"
    await wait_until(lambda: "prompt" in rec["marks"], 10)
    await _keys_hold_resume(ua, rec)
    rx = call.media.stats["rx"]
    await wait_until(lambda: call.media.stats["rx"] > rx + 25, 10)  # still decrypting after the re-INVITEs
    assert voiced_fraction(inbound_pcm(rec)) > 0.15 and call.media.stats["rx_bad"] == 0
    snap = json.loads(json.dumps(call.resume_state()))
    key = call.media.srtp.tx_key
    lines_before = len(ua.lines)

    await _die(a)
    handler_b = RecordingHandler(prompt_pcm)
    b = await make_server(handler_b, dataclasses.replace(sip_settings, srtp="required"))
    resumed, result = await resume(b, snap, leg=2)
    assert result == "resumed" and resumed is not None and resumed.media.srtp is not None
    assert resumed.media.srtp.tx_key == key
    await asyncio.wait_for(handler_b.new_call.wait(), 5)
    rec_b = handler_b.calls[0]
    await wait_until(lambda: resumed.media.stats["rx"] > 50, 10)  # baresip.s audio decrypts here
    await wait_until(lambda: "prompt" in rec_b["marks"], 10)
    await asyncio.sleep(1.0)
    await ua.send("/hangup")
    await asyncio.wait_for(handler_b.call_ended.wait(), 10)
    assert rec_b["ended"] == "hangup" and resumed.media.stats["rx_bad"] == 0
    after = ua.lines[lines_before:]
    assert not [ln for ln in after if "failed to decrypt" in ln], after[-5:]
    # baresip's status line, "audio=TX/RX (bit/s)": what it decrypted from the new process (a packet that fails to
    # decrypt is dropped before it is counted)
    rates = [re.search(r"audio=(\d+)/(\d+)", ln) for ln in after]
    assert max((int(m.group(2)) for m in rates if m), default=0) > 30000, after[-5:]
