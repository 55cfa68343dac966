"""SRTP keyed by SDES (RFC 4568) between the SIP server and our UAC: real sockets, real libsrtp on both ends.

A packet counted as received by an SRTP session passed libsrtp's authentication with the key its peer wrote in the
SDP, so `rx > 0 and rx_bad == 0` on both ends says the audio travelled encrypted and nothing else was taken.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json

import numpy as np
import pytest

from ops.metrics import ERRORS, SIP_CALLS_ANSWERED
from telephony.sip.call import SipCall
import telephony.sip.media as media
from telephony.sip.media import RtpSession
from telephony.sip.resume import resume
from telephony.sip.sdp import SdpSession
from telephony.sip.uac import SipCaller

from .baresip import voiced_fraction
from .conftest import RecordingHandler, inbound_pcm, wait_until
from .test_resume import _replaced

TONE = (6000 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.int16)
SUITE = "AES_CM_128_HMAC_SHA1_80"


def _errors(kind: str) -> float:
    return ERRORS.labels("rtp", kind)._value.get()


async def _call(make_server, settings, prompt_pcm, srtp: str | None = SUITE, **kw):
    handler = RecordingHandler(np.tile(prompt_pcm, 3))
    srv = await make_server(handler, settings)
    caller = SipCaller("127.0.0.1", srv.port, codecs=("PCMU",), srtp=srtp)
    await caller.open()
    return srv, handler, caller


def _answered(media: str) -> float:
    return SIP_CALLS_ANSWERED.labels("udp", media)._value.get()


async def test_an_srtp_call_carries_audio_both_ways_encrypted(make_server, sip_settings, prompt_pcm) -> None:
    srv, handler, caller = await _call(make_server, sip_settings, prompt_pcm)
    srtp_calls, rtp_calls = _answered("srtp"), _answered("rtp")
    try:
        assert await caller.invite() == 200
        await asyncio.wait_for(handler.new_call.wait(), 5)
        assert (_answered("srtp"), _answered("rtp")) == (srtp_calls + 1, rtp_calls)  # the dashboard's share
        call: SipCall = handler.calls[0]["bridge"]
        assert call.media.srtp is not None and call.media.srtp.suite == SUITE
        assert caller.media.srtp is not None
        # each side keys what it sends with its own key, and decrypts with the other's
        assert call.media.srtp.rx_key == caller.media.srtp.tx_key != call.media.srtp.tx_key == caller.media.srtp.rx_key
        await caller.play(TONE, "t")
        await caller.rfc4733_dtmf("5")  # telephone-events ride the SRTP stream too
        await wait_until(lambda: handler.calls[0]["dtmf"] == ["5"], 5)
        await caller.wait_bot_quiet(0.5, 8)
        assert voiced_fraction(inbound_pcm(handler.calls[0]), 1000) > 0.1  # the bot heard the tone
        assert voiced_fraction(caller.recorded()) > 0.05  # the caller heard the prompt
        assert call.media.stats["rx"] > 40 and call.media.stats["rx_bad"] == 0
        assert caller.media.stats["rx"] > 40 and caller.media.stats["rx_bad"] == 0
        assert call.resume_state()["srtp"]["suite"] == SUITE  # type: ignore[index]

        # hold and resume with the same keys: the contexts (rollover counter, replay window) are kept
        ctx_tx, ctx_rx = call.media.srtp._tx, call.media.srtp._rx
        assert await caller.reinvite("sendonly") == 200
        assert await caller.reinvite("sendrecv") == 200
        assert (call.media.srtp._tx, call.media.srtp._rx) == (ctx_tx, ctx_rx)
        rx = call.media.stats["rx"]
        await wait_until(lambda: call.media.stats["rx"] > rx + 20, 5)
        assert call.media.stats["rx_bad"] == 0

        # a plain-RTP re-offer in an encrypted call is a downgrade: 488, and the call stays encrypted
        req = caller._request("INVITE", SdpSession("127.0.0.1").offer(caller.media.local_port, ("PCMU",)),
                              [("Content-Type", "application/sdp")])
        resp = await caller._transact(req, 5)
        assert resp is not None and resp.status == 488 and "srtp_required" in resp.get("Warning")
        caller._send_ack(resp, req)
        assert call.media.srtp is not None and call.media.neg.proto == "RTP/SAVP"
        assert await caller.bye() == 200
    finally:
        caller.close()


async def test_audio_keyed_otherwise_than_the_sdp_said_is_dropped_and_counted(make_server, sip_settings,
                                                                              prompt_pcm) -> None:
    """A forged or wrongly keyed stream is rejected packet by packet: counted, never heard, the call goes on."""
    srv, handler, caller = await _call(make_server, sip_settings, prompt_pcm)
    try:
        assert await caller.invite() == 200
        await asyncio.wait_for(handler.new_call.wait(), 5)
        call: SipCall = handler.calls[0]["bridge"]
        before = _errors("srtp_auth_failed")
        heard = len(caller.recording)
        caller.media.srtp.rekey(SUITE, bytes(30), caller.media.srtp.rx_key)  # the caller encrypts with a wrong key
        await caller.play(TONE, "t")
        await wait_until(lambda: _errors("srtp_auth_failed") >= before + 30, 5)
        assert voiced_fraction(inbound_pcm(handler.calls[0]), 1000) == 0.0  # nothing of it reached the bot
        assert call.state == "confirmed"
        await wait_until(lambda: len(caller.recording) > heard + 20, 5)  # the bot's audio still reaches the caller
        assert caller.media.stats["rx_bad"] == 0
        assert await caller.bye() == 200
    finally:
        caller.close()


async def test_required_refuses_plain_rtp_and_offers_srtp_itself(make_server, sip_settings, prompt_pcm) -> None:
    settings = dataclasses.replace(sip_settings, srtp="required")
    srv, handler, plain = await _call(make_server, settings, prompt_pcm, srtp=None)
    late = SipCaller("127.0.0.1", srv.port, codecs=("PCMU",))
    await late.open()
    try:
        assert await plain.invite() == 488
        # an INVITE without SDP: the bot's offer in its 200 is SRTP, our answer in the ACK keys it
        failed_before = _errors("srtp_auth_failed")
        assert await late.invite(late_offer=True) == 200
        await asyncio.wait_for(handler.new_call.wait(), 5)
        call: SipCall = handler.calls[0]["bridge"]
        await wait_until(lambda: call.media.srtp is not None and late.media.srtp is not None, 5)
        await late.play(TONE, "t")
        await late.wait_bot_quiet(0.5, 8)
        assert voiced_fraction(inbound_pcm(handler.calls[0]), 1000) > 0.1
        # (the caller's first packets may beat its ACK, which carries the answer, to the bot: "no_session", not SRTP)
        assert _errors("srtp_auth_failed") == failed_before
        assert late.media.stats["rx"] > 20 and late.media.stats["rx_bad"] == 0
        assert await late.bye() == 200
    finally:
        plain.close()
        late.close()


async def test_off_refuses_srtp_offers(make_server, sip_settings, prompt_pcm) -> None:
    srv, handler, caller = await _call(make_server, dataclasses.replace(sip_settings, srtp="off"), prompt_pcm)
    try:
        assert await caller.invite() == 488
        assert not handler.calls
    finally:
        caller.close()


async def _wrap(sender: RtpSession, receiver: RtpSession) -> None:
    """Move `sender`'s sequence number across 65535 -> 0 in steps `receiver`'s SRTP takes as progress (under 2^15):
    its rollover counter becomes 1 or 2, what a call of ~22 minutes reaches at the latest."""
    for jump in (0x6000, 0x6000, 0x6000, 0):  # 0x12000 and a few packets: one wrap or two, whatever the start
        rx = receiver.stats["rx"]
        await wait_until(lambda: receiver.stats["rx"] > rx + 5, 5)  # sent (and taken) before the next step
        sender._seq = (sender._seq + jump) & 0xFFFF
    assert sender.srtp is not None and receiver.srtp is not None
    assert sender.srtp.sent.roc >= 1 and receiver.srtp.received.roc == sender.srtp.sent.roc
    assert receiver.stats["rx_bad"] == 0


@pytest.mark.parametrize("srtp,wrapped", [(SUITE, ""), (SUITE, "bot"), (SUITE, "phone"), ("AEAD_AES_128_GCM", "bot")])
async def test_an_srtp_call_carried_on_by_another_process_goes_on_under_the_same_key(
        make_server, sip_settings, prompt_pcm, srtp: str, wrapped: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process that carries the call on encrypts under the lost process's key, from its rollover counter and
    past the SRTCP indexes it used: the phone's contexts go on as after packet loss (no re-keying needed). The
    phone's key is never written down: it comes again in the phone's answer."""
    monkeypatch.setattr(media, "RTCP_INTERVAL_S", 0.3)
    srv, handler, caller = await _call(make_server, sip_settings, prompt_pcm, srtp=srtp)
    try:
        assert await caller.invite() == 200
        await asyncio.wait_for(handler.new_call.wait(), 5)
        call: SipCall = handler.calls[0]["bridge"]
        await wait_until(lambda: call.established, 5)
        if wrapped == "bot":
            await _wrap(call.media, caller.media)
        elif wrapped == "phone":
            await _wrap(caller.media, call.media)
        await wait_until(lambda: caller.media.stats["rtcp_rx"] >= 3, 5)  # SRTCP indexes 0..2 used by this process
        snap = json.loads(json.dumps(call.resume_state()))
        assert snap["srtp"]["suite"] == srtp and snap["srtp"]["sent_rtcp"] >= 3
        assert (snap["srtp"]["sent_roc"] > 0) == (wrapped == "bot") and (snap["srtp"]["peer_roc"] > 0) == (wrapped == "phone")
        phone_key = base64.b64encode(caller.media.srtp.tx_key).decode()
        assert phone_key not in json.dumps(snap) and "crypto" not in json.dumps(snap)  # the phone's key: not kept
        bot_key = call.media.srtp.tx_key
        phone_rx_context = caller.media.srtp._rx
        await caller.wait_bot_quiet(0.3, 8)
        heard = len(caller.recording)
        failed_before, answered_before = _errors("srtp_auth_failed"), _answered("srtp")
        rtcp_failed_before = _errors("srtcp_auth_failed")
        b, handler_b = await _replaced(srv, sip_settings, prompt_pcm)
        try:
            resumed, result = await resume(b, snap, leg=2)
            assert result == "resumed" and resumed is not None
            assert resumed.media.srtp is not None and resumed.media.srtp.tx_key == bot_key
            assert caller.media.srtp._rx is phone_rx_context  # the phone did not re-key: the same context goes on
            rtcp_before = caller.media.stats["rtcp_rx"]
            await caller.play(TONE, "after")
            await caller.wait_bot_quiet(0.5, 8)
            assert voiced_fraction(inbound_pcm(handler_b.calls[0]), 1000) > 0.1
            # the new process's SRTCP is taken by the phone's context too (its indexes moved past the old ones)
            assert caller.media.stats["rtcp_rx"] >= rtcp_before + 3
            assert _errors("srtcp_auth_failed") == rtcp_failed_before
            assert voiced_fraction(np.concatenate(caller.recording[heard:])) > 0.05  # decrypted by the old context
            # (the phone's first packets may reach the new port before its answer does: "no_session", not SRTP)
            assert _errors("srtp_auth_failed") == failed_before and caller.media.stats["rx_bad"] == 0
            assert _answered("srtp") == answered_before  # the same call, not another one answered
            assert await caller.bye() == 200
        finally:
            await b.stop()
    finally:
        caller.close()
