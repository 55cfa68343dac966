"""QA probes of what a PBX does mid-call: a re-INVITE that moves the media, G.711 on a dynamic payload type,
INVITE with Replaces (attended transfer / call pickup onto a bot call)."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
from prometheus_client import REGISTRY

from telephony.g711 import ulaw_encode
from telephony.sip.message import SipMessage, parse_message
from telephony.sip.rtp import build_rtp, parse_rtp
from telephony.sip.sdp import parse_sdp
from telephony.sip.uac import SipCaller

from .baresip import voiced_fraction
from .conftest import RecordingHandler, inbound_pcm, wait_until
from .test_server import RawUdp


def _errors(kind: str, component: str = "rtp") -> float:
    return REGISTRY.get_sample_value("voicebot_errors_total", {"component": component, "kind": kind}) or 0.0


def _sdp(ip: str, port: int, fmts: str = "0 101", extra: str = "a=rtpmap:101 telephone-event/8000\r\n") -> bytes:
    return (f"v=0\r\no=x 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP {fmts}\r\n{extra}").encode()


def _rtp_sock(ip: str, port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, port))
    s.setblocking(False)
    return s


async def _final(raw: RawUdp, timeout: float = 5.0) -> SipMessage:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        msg = parse_message(await asyncio.wait_for(loop.sock_recv(raw.sock, 65536), deadline - loop.time()))
        if msg.status >= 200:
            return msg


def _ack(raw: RawUdp, port: int, ok: SipMessage, call_id: str, cseq: int) -> None:
    from telephony.sip.message import new_branch

    ack = (f"ACK sip:bot@127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{raw.port};branch={new_branch()}\r\n"
           f"From: <sip:raw@127.0.0.1>;tag=abc\r\nTo: <sip:bot@127.0.0.1>;tag={ok.to_tag}\r\n"
           f"Call-ID: {call_id}\r\nCSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n").encode()
    raw.sock.sendto(ack, ("127.0.0.1", port))


async def _recv_rtp(sock: socket.socket, timeout: float) -> bytes | None:
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 2048), timeout)
    except asyncio.TimeoutError:
        return None


async def test_reinvite_moving_media_to_a_new_address_is_followed_at_once(make_server, sip_settings,
                                                                          prompt_pcm) -> None:
    """The PBX re-INVITEs to move the stream to another host (same port). Our latched peer used to be kept
    because only the port was compared: the bot kept talking to the old media host and the caller heard
    nothing until the new host had sent five packets (never, if it waits for ours)."""
    handler = RecordingHandler(np.tile(prompt_pcm, 20))
    srv = await make_server(handler, sip_settings)
    raw = RawUdp()
    old = _rtp_sock("127.0.0.1")
    port = old.getsockname()[1]
    try:
        new = _rtp_sock("127.0.0.2", port)
    except OSError:
        new = None
    call_id = "qa-move-1"
    try:
        assert new is not None, "127.0.0.2 must be bindable (loopback /8)"
        extra = f"Content-Type: application/sdp\r\nContact: <sip:raw@127.0.0.1:{raw.port}>\r\n"
        raw.sock.sendto(raw.request("INVITE", srv.port, extra, _sdp("127.0.0.1", port), call_id=call_id),
                        ("127.0.0.1", srv.port))
        ok = await _final(raw)
        assert ok.status == 200
        _ack(raw, srv.port, ok, call_id, 1)
        bot_rtp = parse_sdp(ok.body).media[0].port
        for i in range(6):  # latch the bot to the old host
            old.sendto(build_rtp(0, 100 + i, 160 * i, 0x1234, ulaw_encode(np.zeros(160, np.int16))),
                       ("127.0.0.1", bot_rtp))
            await asyncio.sleep(0.02)
        assert await _recv_rtp(old, 2.0) is not None
        reinv = raw.request("INVITE", srv.port, extra, _sdp("127.0.0.2", port), call_id=call_id, cseq=2,
                            to_tag=ok.to_tag)
        raw.sock.sendto(reinv, ("127.0.0.1", srv.port))
        ok2 = await _final(raw)
        assert ok2.status == 200
        _ack(raw, srv.port, ok2, call_id, 2)
        assert await _recv_rtp(new, 1.0) is not None, "bot audio did not follow the re-INVITE"
        call = handler.calls[0]["bridge"]
        assert call.media.remote == ("127.0.0.2", port)
    finally:
        raw.close()
        old.close()
        if new is not None:
            new.close()


async def test_pcmu_on_a_dynamic_payload_type_is_heard(make_server, sip_settings, prompt_pcm) -> None:
    """An offer mapping PCMU to PT 96 (legal in SDP, seen from some gateways): we answer PT 96, so the caller
    sends PT 96, and every packet used to be dropped as unknown_payload_type (the bot heard silence)."""
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    raw = RawUdp()
    media = _rtp_sock("127.0.0.1")
    port = media.getsockname()[1]
    bad_before = _errors("unknown_payload_type")
    call_id = "qa-dyn-pt"
    tone = (6000 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.int16)
    try:
        extra = f"Content-Type: application/sdp\r\nContact: <sip:raw@127.0.0.1:{raw.port}>\r\n"
        sdp = _sdp("127.0.0.1", port, "96 101", "a=rtpmap:96 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n")
        raw.sock.sendto(raw.request("INVITE", srv.port, extra, sdp, call_id=call_id), ("127.0.0.1", srv.port))
        ok = await _final(raw)
        assert ok.status == 200
        _ack(raw, srv.port, ok, call_id, 1)
        m = parse_sdp(ok.body).media[0]
        assert m.fmts[0] == 96 and m.rtpmap[96].upper().startswith("PCMU")
        for i in range(50):
            frame = tone[i * 160 % 8000:(i * 160 % 8000) + 160]
            media.sendto(build_rtp(96, 500 + i, 160 * i, 0x55, ulaw_encode(frame)), ("127.0.0.1", m.port))
            await asyncio.sleep(0.02)
        pkt = await _recv_rtp(media, 2.0)  # and we send PT 96 too
        assert pkt is not None and parse_rtp(pkt).pt == 96
        await asyncio.sleep(0.3)
        assert voiced_fraction(inbound_pcm(handler.calls[0]), 1000) > 0.3
        assert _errors("unknown_payload_type") == bad_before
    finally:
        raw.close()
        media.close()


async def test_invite_with_replaces_takes_over_the_call(make_server, sip_settings, prompt_pcm) -> None:
    """Attended transfer / pickup onto a bot call: the new INVITE names our dialog in Replaces. A PBX answers
    it and BYEs the replaced leg; a Replaces naming no dialog gets 481. We used to answer it as an unrelated
    second call and leave the old leg talking to no one until its RTP timed out."""
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    first = SipCaller("127.0.0.1", srv.port)
    await first.open()
    raw = RawUdp()
    media = _rtp_sock("127.0.0.1")
    extra = f"Content-Type: application/sdp\r\nContact: <sip:raw@127.0.0.1:{raw.port}>\r\n"
    sdp = _sdp("127.0.0.1", media.getsockname()[1])
    try:
        assert await first.invite() == 200
        await wait_until(lambda: len(handler.calls) == 1, 5)
        bogus = raw.request("INVITE", srv.port, extra + f"Replaces: nope;to-tag=x;from-tag=y\r\nRequire: replaces\r\n",
                            sdp, call_id="qa-repl-0")
        assert (await raw.exchange(bogus, srv.port)).status == 481
        repl = f"Replaces: {first.call_id};to-tag={first.to_tag};from-tag={first.from_tag}\r\nRequire: replaces\r\n"
        raw.sock.sendto(raw.request("INVITE", srv.port, extra + repl, sdp, call_id="qa-repl-1"),
                        ("127.0.0.1", srv.port))
        ok = await _final(raw)
        assert ok.status == 200
        _ack(raw, srv.port, ok, "qa-repl-1", 1)
        await asyncio.wait_for(first.ended.wait(), 5)  # the replaced leg got our BYE
        assert first.hangup_by == "bot"
        await wait_until(lambda: handler.calls[0]["ended"] is not None and len(handler.calls) == 2, 5)
        assert handler.calls[0]["ended"] == "replaced"
        assert handler.calls[1]["bridge"].state == "confirmed"
        assert handler.calls[1]["bridge"].info.resumes == first.call_id  # the conversation carries on there
        # 420 is still the answer to extensions we do not have
        other = raw.request("INVITE", srv.port, extra + "Require: precondition\r\n", sdp, call_id="qa-repl-2")
        resp = await raw.exchange(other, srv.port)
        assert resp.status == 420 and resp.get("Unsupported") == "precondition"
    finally:
        first.close()
        raw.close()
        media.close()


def _transfers(result: str, queue: str) -> float:
    return REGISTRY.get_sample_value("voicebot_transfers_total",
                                     {"transport": "sip", "queue": queue, "result": result}) or 0.0


async def test_caller_hangup_during_refer_is_not_a_failed_transfer(make_server, sip_settings, prompt_pcm) -> None:
    """The caller's phone accepts our REFER (202) and then hangs up before any NOTIFY. That used to count as a
    failed transfer (voicebot_transfers_total{result="failed"}, the figure on-call watches); it is counted as
    caller_hangup, and no fallback REFER is sent on the dead call."""
    import dataclasses

    from telephony.sip.message import make_response

    handler = RecordingHandler(prompt_pcm)
    settings = dataclasses.replace(sip_settings, queue_uris={"qa_billing": "sip:billing@127.0.0.1:9"},
                                   transfer_fallback="sip:fallback@127.0.0.1:9")
    srv = await make_server(handler, settings)
    raw = RawUdp()
    media = _rtp_sock("127.0.0.1")
    loop = asyncio.get_running_loop()
    failed_before, gone_before = _transfers("failed", "qa_billing"), _transfers("caller_hangup", "qa_billing")
    call_id = "qa-refer-bye"
    try:
        extra = f"Content-Type: application/sdp\r\nContact: <sip:raw@127.0.0.1:{raw.port}>\r\n"
        raw.sock.sendto(raw.request("INVITE", srv.port, extra, _sdp("127.0.0.1", media.getsockname()[1]),
                                    call_id=call_id), ("127.0.0.1", srv.port))
        ok = await _final(raw)
        _ack(raw, srv.port, ok, call_id, 1)
        await wait_until(lambda: len(handler.calls) == 1, 5)
        transfer = asyncio.ensure_future(handler.calls[0]["bridge"].transfer("qa_billing", {}))
        refer = None
        while refer is None:
            msg = parse_message(await asyncio.wait_for(loop.sock_recv(raw.sock, 65536), 5))
            if msg.method == "REFER":
                refer = msg
        raw.sock.sendto(make_response(refer, 202).encode(), ("127.0.0.1", srv.port))
        bye = raw.request("BYE", srv.port, to_tag=ok.to_tag, call_id=call_id, cseq=2)
        assert (await raw.exchange(bye, srv.port)).status == 200
        assert await asyncio.wait_for(transfer, 5) is False
        with_fallback: list[str] = []
        deadline = loop.time() + 1.0
        while loop.time() < deadline:  # no fallback REFER to the call that is gone
            try:
                m = parse_message(await asyncio.wait_for(loop.sock_recv(raw.sock, 65536), deadline - loop.time()))
            except asyncio.TimeoutError:
                break
            if m.method == "REFER":
                with_fallback.append(m.get("Refer-To"))
        assert not with_fallback
    finally:
        raw.close()
        media.close()
    assert handler.calls[0]["ended"] == "hangup"
    assert _transfers("caller_hangup", "qa_billing") - gone_before == 1
    assert _transfers("failed", "qa_billing") == failed_before


async def test_music_on_hold_from_the_caller_is_not_caller_speech(make_server, sip_settings, prompt_pcm) -> None:
    """The caller's PBX holds the bot (re-INVITE sendonly) and streams music on hold to it. That audio reached
    the conversation as if the caller spoke (turns taken on music, reprompts, escalations); while held, the bot
    hears silence, and the caller's audio is back as soon as they resume."""
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    tone = (6000 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.int16)
    caller = SipCaller("127.0.0.1", srv.port)
    await caller.open()
    try:
        assert await caller.invite() == 200
        await wait_until(lambda: len(handler.calls) == 1, 5)
        rec = handler.calls[0]
        assert await caller.reinvite("sendonly") == 200
        held_from = len(rec["audio"])
        await caller.play(tone, "moh")  # "music on hold"
        await asyncio.sleep(0.3)
        held = np.concatenate(rec["audio"][held_from:])
        assert await caller.reinvite("sendrecv") == 200
        resumed_from = len(rec["audio"])
        await caller.play(tone, "speech")
        await asyncio.sleep(0.3)
        resumed = np.concatenate(rec["audio"][resumed_from:])
        assert await caller.bye() == 200
    finally:
        caller.close()
    assert held.size >= 8000 and voiced_fraction(held, 1000) == 0
    assert voiced_fraction(resumed, 1000) > 0.3


async def test_caller_ptimes_10_30_and_odd_25_ms_reach_the_bot_whole(make_server, sip_settings, prompt_pcm) -> None:
    """Trunks send 10, 30 (or odd) ms packets; the bot must still get a continuous 20 ms stream of the tone,
    not choppy audio with concealment gaps."""
    tone = (6000 * np.sin(2 * np.pi * 440 * np.arange(16000) / 8000)).astype(np.int16)
    for ptime in (10, 25, 30):
        handler = RecordingHandler(prompt_pcm)
        srv = await make_server(handler, sip_settings)
        raw = RawUdp()
        media = _rtp_sock("127.0.0.1")
        call_id = f"qa-ptime-{ptime}"
        try:
            extra = f"Content-Type: application/sdp\r\nContact: <sip:raw@127.0.0.1:{raw.port}>\r\n"
            sdp = _sdp("127.0.0.1", media.getsockname()[1], "0", f"a=ptime:{ptime}\r\n")
            raw.sock.sendto(raw.request("INVITE", srv.port, extra, sdp, call_id=call_id), ("127.0.0.1", srv.port))
            ok = await _final(raw)
            assert ok.status == 200
            _ack(raw, srv.port, ok, call_id, 1)
            await wait_until(lambda: len(handler.calls) == 1, 5)
            rec = handler.calls[0]
            bot_port = parse_sdp(ok.body).media[0].port
            n = ptime * 8
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for i in range(len(tone) // n):  # paced on an absolute grid, like a phone
                media.sendto(build_rtp(0, 1000 + i, n * i, 0x77, ulaw_encode(tone[i * n:(i + 1) * n])),
                             ("127.0.0.1", bot_port))
                await asyncio.sleep(max(0.0, t0 + (i + 1) * ptime / 1000 - loop.time()))
            await asyncio.sleep(0.4)
        finally:
            raw.close()
            media.close()
        frames = [f for f in rec["audio"]]
        rms = np.array([np.sqrt(np.mean(f.astype(np.float64) ** 2)) for f in frames])
        voiced = np.flatnonzero(rms > 2000)
        assert voiced.size >= 90, (ptime, voiced.size)  # ~100 frames of tone in 2 s
        span = voiced[-1] - voiced[0] + 1
        assert voiced.size >= 0.9 * span, (ptime, voiced.size, span)  # continuous: no holes in the tone
