"""QA: DTMF sent twice by the phone (RFC 4733 and SIP INFO), and an answered INVITE whose ACK never comes."""

from __future__ import annotations

import asyncio
import dataclasses

from prometheus_client import REGISTRY

from telephony.sip.message import SipMessage, parse_message
from telephony.sip.uac import SipCaller

from .conftest import RecordingHandler, wait_until
from .test_server import RawUdp


def _errors(kind: str, component: str = "sip") -> float:
    return REGISTRY.get_sample_value("voicebot_errors_total", {"component": component, "kind": kind}) or 0.0


async def test_key_sent_as_rfc4733_and_info_is_one_press(make_server, sip_settings, prompt_pcm) -> None:
    """A phone that sends every key both ways (either copy may come first) must press each key once; a
    key pressed twice is still two presses. Before the fix "5 5 3" arrived as "5 5 5 5 3 3"."""
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    dup_before = _errors("dtmf_duplicate")
    caller = SipCaller("127.0.0.1", srv.port)
    await caller.open()
    try:
        assert await caller.invite() == 200
        # key 1: INFO first (signalling beat the media), then the telephone-event
        assert await caller.info_dtmf("5") == 200
        await caller.rfc4733_dtmf("5")
        # key 2, same digit: telephone-event first, then INFO (still answered 200, or the phone retransmits)
        await caller.rfc4733_dtmf("5")
        assert await caller.info_dtmf("5") == 200
        # key 3: both copies at once
        info = asyncio.ensure_future(caller.info_dtmf("3"))
        await caller.rfc4733_dtmf("3")
        assert await info == 200
        await asyncio.sleep(0.5)
        assert await caller.bye() == 200
    finally:
        caller.close()
    await asyncio.wait_for(handler.call_ended.wait(), 5)
    assert handler.calls[0]["dtmf"] == ["5", "5", "3"]
    assert handler.calls[0]["bridge"].dtmf_duplicates == 3
    assert _errors("dtmf_duplicate") - dup_before == 3


async def test_info_only_phone_pressing_a_key_twice_is_two_presses(make_server, sip_settings, prompt_pcm) -> None:
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    caller = SipCaller("127.0.0.1", srv.port)
    await caller.open()
    try:
        assert await caller.invite() == 200
        for d in "0", "0", "#":
            assert await caller.info_dtmf(d) == 200
        await wait_until(lambda: len(handler.calls[0]["dtmf"]) >= 3, 5)
        assert await caller.bye() == 200
    finally:
        caller.close()
    await asyncio.wait_for(handler.call_ended.wait(), 5)
    assert handler.calls[0]["dtmf"] == ["0", "0", "#"]
    assert handler.calls[0]["bridge"].dtmf_duplicates == 0


async def test_answered_invite_without_ack_is_a_setup_failure(make_server, sip_settings, prompt_pcm) -> None:
    """Our 200 OK is never ACKed (it never reached the caller, or their ACK cannot reach our Contact). The call
    must end after Timer H (64*T1 = 32 s) as error:no_ack, BYE the caller, and meanwhile not look like a caller
    who went silent: the bridge reports on_hold (the conversation's no-input timer waits) and the RTP timeout
    (1 s here) does not fire. It used to end as rtp_timeout ("abandoned") or, in the bot, as no_input."""
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, dataclasses.replace(sip_settings, rtp_timeout_s=1.0))
    no_ack_before = _errors("no_ack")
    raw = RawUdp()
    loop = asyncio.get_running_loop()
    sdp = (b"v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           b"m=audio 4002 RTP/AVP 0\r\n")
    try:
        invite = raw.request("INVITE", srv.port, f"Content-Type: application/sdp\r\n"
                             f"Contact: <sip:raw@127.0.0.1:{raw.port}>\r\n", sdp, call_id="qa-no-ack")
        raw.sock.sendto(invite, ("127.0.0.1", srv.port))
        await asyncio.wait_for(handler.new_call.wait(), 5)
        call = handler.calls[0]["bridge"]
        assert call.on_hold and not call.established
        await asyncio.sleep(3.0)  # three RTP timeouts' worth of silence
        assert call.state != "terminated" and handler.calls[0]["ended"] is None
        got: list[SipMessage] = []
        deadline = loop.time() + 40
        while loop.time() < deadline:
            try:
                msg = parse_message(await asyncio.wait_for(loop.sock_recv(raw.sock, 65536), deadline - loop.time()))
            except asyncio.TimeoutError:
                break
            got.append(msg)
            if msg.method == "BYE":
                raw.sock.sendto(_response(msg, 200), ("127.0.0.1", srv.port))
                break
        assert any(m.method == "BYE" for m in got), [m.method or m.status for m in got]
        await asyncio.wait_for(handler.call_ended.wait(), 5)
    finally:
        raw.close()
    assert handler.calls[0]["ended"] == "error:no_ack"
    assert _errors("no_ack") - no_ack_before == 1


async def test_late_ack_confirms_call_and_arms_rtp_timeout(make_server, sip_settings, prompt_pcm) -> None:
    """The other side of the fix: once ACKed, the call is no longer 'on hold' and a dead RTP stream times out."""
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, dataclasses.replace(sip_settings, rtp_timeout_s=1.0))
    caller = SipCaller("127.0.0.1", srv.port)
    await caller.open()
    try:
        assert await caller.invite() == 200
        await asyncio.wait_for(handler.new_call.wait(), 5)
        call = handler.calls[0]["bridge"]
        await wait_until(lambda: call.established, 5)
        assert not call.on_hold
        caller.media.close()
        await asyncio.wait_for(handler.call_ended.wait(), 10)
        assert handler.calls[0]["ended"] == "rtp_timeout"
    finally:
        caller.close()


def _response(req: SipMessage, status: int) -> bytes:
    from telephony.sip.message import make_response
    return make_response(req, status).encode()
