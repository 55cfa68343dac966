"""RTP audio quality (telephony/sip/quality.py, RFC 3550): loss and jitter of what we receive, the report blocks in
our RTCP, and the phone's RTCP about what we send; a lossy caller's call says which way the audio suffered."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

import telephony.sip.media as media
from ops.metrics import AUDIO_LOSS
from telephony.sip.quality import Reception, parse_reports, round_trip_s
from telephony.sip.rtp import build_sender_report
from telephony.sip.uac import SipCaller

from .conftest import RecordingHandler, wait_until


def test_loss_and_jitter_of_a_stream_across_a_sequence_wrap() -> None:
    r = Reception()
    seqs = [(65500 + i) & 0xFFFF for i in range(200) if i not in (10, 11, 150)]  # 3 of 200 lost, wrap at 36
    for n, seq in enumerate(seqs):
        i = (seq - 65500) & 0xFFFF
        r.packet(0xABC, seq, 1000 + 160 * i, 10.0 + 0.02 * i, audio=True)  # on time: no jitter
    assert (r.expected, r.received, r.lost) == (200, 197, 3) and r.jitter_s < 1e-6
    r.packet(0xABC, 65500 - 5, 0, 12.0, audio=True)  # a late duplicate-ish packet from before: no move backwards
    assert r.expected == 200
    j = Reception()
    for i in range(400):  # arrivals wobbling +-10 ms around their timestamps
        j.packet(1, i, 160 * i, 0.02 * i + (0.01 if i % 2 else -0.01), audio=True)
    assert 0.015 < j.jitter_s < 0.025  # RFC 3550's estimate converges to the mean |D| (20 ms here)


def test_our_sender_report_carries_a_block_the_phone_can_read_and_the_round_trip() -> None:
    r = Reception()
    for i in range(100):
        if i % 10 != 5:
            r.packet(0x55, i, 160 * i, 0.02 * i, audio=True)
    blocks, sr = parse_reports(build_sender_report(0x77, 1, 2, 3, r.block()))
    assert sr is not None and sr[0] == 0x77 and len(blocks) == 1
    b = blocks[0]
    assert b.ssrc == 0x55 and b.cumulative_lost == 10 and abs(b.fraction_lost - 0.1) < 0.01 and b.ext_highest_seq == 99
    assert b.lsr == 0 and round_trip_s(b, 0, 0) is None  # no SR of the phone's seen yet: no round trip
    assert parse_reports(build_sender_report(0x77, 1, 2, 3))[0] == []  # nothing received yet: no block
    again = r.block()  # nothing new since: fraction 0 for the interval, cumulative kept
    assert again is not None and parse_reports(build_sender_report(1, 1, 1, 1, again))[0][0].fraction_lost == 0


class _Lossy:
    """The caller's RTP socket dropping every 10th packet it sends (as sip-rtp-loss does in the chaos harness)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.n = inner, 0

    def sendto(self, data: bytes, addr: Any) -> None:
        self.n += 1
        if self.n % 10:
            self.inner.sendto(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("srtp", [None, "AES_CM_128_HMAC_SHA1_80"])
async def test_a_lossy_caller_s_call_says_which_way_the_audio_suffered(make_server, sip_settings, prompt_pcm,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        srtp: str | None) -> None:
    monkeypatch.setattr(media, "RTCP_INTERVAL_S", 0.5)
    handler = RecordingHandler(np.tile(prompt_pcm, 4))
    srv = await make_server(handler, sip_settings)
    caller = SipCaller("127.0.0.1", srv.port, srtp=srtp)
    await caller.open()
    caller.media._rtp = _Lossy(caller.media._rtp)  # type: ignore[assignment]
    observed = AUDIO_LOSS.labels("in")._sum.get()
    try:
        assert await caller.invite() == 200
        await asyncio.wait_for(handler.new_call.wait(), 5)
        call = handler.calls[0]["bridge"]
        await caller.play((3000 * np.sin(2 * np.pi * 440 * np.arange(8000 * 6) / 8000)).astype(np.int16), "t")
        await wait_until(lambda: call.media.peer_report is not None and caller.media.peer_report is not None, 5)
        await asyncio.sleep(1.0)  # a report after the last loss
        q = call.media_quality()
        assert q is not None and 8 <= q["rx_loss_pct"] <= 12, q  # what the bot received from the caller
        assert q["peer_loss_pct"] == 0 and "rtt_ms" in q and q["rtt_ms"] < 200, q  # the caller got all of the bot
        theirs = caller.media.quality()
        assert theirs is not None and 7 <= theirs["peer_loss_pct"] <= 12, theirs  # the bot's RTCP told the caller
        assert await caller.bye() == 200
        await asyncio.wait_for(handler.call_ended.wait(), 5)
    finally:
        caller.close()
    assert 0.08 <= AUDIO_LOSS.labels("in")._sum.get() - observed <= 0.12  # the call's loss went to the fleet's histogram
