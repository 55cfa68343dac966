"""Reliable provisional responses (RFC 3262, 100rel): carriers and IMS SBCs that send `Require: 100rel` got 420 and
the call failed. The bot's 180 is now sent reliably (RSeq, retransmitted until PRACKed) and the call goes on."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np

from ops.metrics import SIP_MESSAGES
from telephony.sip.uac import SipCaller

from .baresip import voiced_fraction
from .conftest import RecordingHandler, inbound_pcm, wait_until

TONE = (6000 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.int16)
REQUIRE = [("Require", "100rel"), ("Supported", "100rel")]


def _retransmitted() -> float:
    return SIP_MESSAGES.labels("INVITE", "retransmit_180")._value.get()


async def test_a_caller_requiring_100rel_gets_a_reliable_180_and_the_call_goes_on(make_server, sip_settings,
                                                                                   prompt_pcm) -> None:
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    caller = SipCaller("127.0.0.1", srv.port)
    await caller.open()
    try:
        assert await caller.invite(extra=REQUIRE) == 200, caller.error  # was 420 Bad Extension
        # with no ring time the 200 goes at once (the 180 has no SDP: RFC 3262 3), the PRACK is answered after it
        await wait_until(lambda: caller.prack_status is not None, 5)
        assert caller.reliable_rseqs and caller.prack_status == 200
        await asyncio.wait_for(handler.new_call.wait(), 5)
        call = handler.calls[0]["bridge"]
        assert call.reliable_provisional is not None and call.prack_received.is_set()
        await caller.play(TONE, "t")
        await caller.wait_bot_quiet(0.5, 8)
        assert await caller.bye() == 200  # the PRACK's CSeq did not upset the dialog's order
        await asyncio.wait_for(handler.call_ended.wait(), 5)
    finally:
        caller.close()
    assert voiced_fraction(inbound_pcm(handler.calls[0]), 1000) > 0.1
    assert voiced_fraction(caller.recorded()) > 0.05


async def test_the_180_is_sent_again_until_its_prack_and_a_prack_for_nothing_gets_481(make_server, sip_settings,
                                                                                       prompt_pcm) -> None:
    srv = await make_server(RecordingHandler(prompt_pcm), dataclasses.replace(sip_settings, ring_s=3.0))
    caller = SipCaller("127.0.0.1", srv.port)
    caller.prack = False  # a caller slow to PRACK: the bot must not rely on the first copy arriving
    await caller.open()
    before = _retransmitted()
    try:
        task = asyncio.get_running_loop().create_task(caller.invite(extra=REQUIRE))
        await wait_until(lambda: len(caller.reliable_rseqs) >= 3, 5)  # at 0, 0.5 and 1.5 s
        rseq = caller.reliable_rseqs[0]
        assert set(caller.reliable_rseqs) == {rseq} and _retransmitted() >= before + 2
        invite_cseq = caller._invite.cseq[0]
        to_tag = next(iter(srv._pending.values())).local_tag  # the early dialog's (ringing, not answered yet)
        assert await caller.send_prack(rseq + 1, invite_cseq, to_tag) == 481  # no such provisional response
        assert await caller.send_prack(rseq, invite_cseq, to_tag) == 200
        copies = len(caller.reliable_rseqs)
        assert await task == 200  # answered after the ring time
        assert len(caller.reliable_rseqs) == copies  # no copy after the PRACK
        assert await caller.bye() == 200
    finally:
        caller.close()


async def test_options_says_100rel_and_prack_are_supported(make_server, sip_settings, prompt_pcm) -> None:
    srv = await make_server(RecordingHandler(prompt_pcm), sip_settings)
    caller = SipCaller("127.0.0.1", srv.port)
    await caller.open()
    try:
        resp = await caller._transact(caller._request("OPTIONS"), 5)
        assert resp is not None and resp.status == 200
        assert "100rel" in resp.get("Supported") and "PRACK" in resp.get("Allow")
    finally:
        caller.close()
