"""SipServer protocol behaviour over real sockets: our UAC and raw UDP/TCP datagrams as peers."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from typing import Any

import numpy as np
import pytest

from telephony.bridge import CallBridge
from telephony.sip.message import SipMessage, make_response, new_branch, parse_message
from telephony.sip.uac import SipCaller, run_sip_call

from .baresip import voiced_fraction
from .conftest import RecordingHandler, inbound_pcm, wait_until


class RawUdp:
    """A bare UDP socket for hand-written SIP messages."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def request(self, method: str, port: int, extra: str = "", body: bytes = b"", to_tag: str = "",
                call_id: str = "raw-1", cseq: int = 1, ua: str = "test") -> bytes:
        to = f"<sip:bot@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
        msg = (f"{method} sip:bot@127.0.0.1:{port} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={new_branch()}\r\n"
               f"From: <sip:raw@127.0.0.1>;tag=abc\r\nTo: {to}\r\nCall-ID: {call_id}\r\n"
               f"CSeq: {cseq} {method}\r\nMax-Forwards: 70\r\nUser-Agent: {ua}\r\n{extra}"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        return msg

    async def exchange(self, data: bytes, port: int, timeout: float = 3.0) -> SipMessage | None:
        """Send and return the first final response (None if the server stays silent)."""
        loop = asyncio.get_running_loop()
        self.sock.sendto(data, ("127.0.0.1", port))
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                resp = parse_message(await asyncio.wait_for(loop.sock_recv(self.sock, 65536), deadline - loop.time()))
            except asyncio.TimeoutError:
                return None
            if resp.status >= 200:
                return resp
        return None

    def close(self) -> None:
        self.sock.close()


async def test_uac_echo_media_info_dtmf_and_bye(make_server, sip_settings, prompt_pcm, tmp_path) -> None:
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    tone = (6000 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.int16)
    caller = SipCaller("127.0.0.1", srv.port, codecs=("PCMA",))
    await caller.open()
    try:
        assert await caller.invite() == 200
        await caller.play(tone, "t")
        assert await caller.info_dtmf("7") == 200
        await caller.rfc4733_dtmf("9")
        await wait_until(lambda: handler.calls and len(handler.calls[0]["dtmf"]) >= 2, 5)
        await caller.wait_bot_quiet(0.5, 5)
        assert await caller.bye() == 200
    finally:
        caller.close()
    await asyncio.wait_for(handler.call_ended.wait(), 5)
    rec = handler.calls[0]
    assert rec["dtmf"] == ["7", "9"]
    assert rec["bridge"].media.neg.codec == "PCMA"
    assert voiced_fraction(inbound_pcm(rec), 1000) > 0.1  # our tone reached the bot
    assert voiced_fraction(caller.recorded()) > 0.05  # the prompt reached us
    assert caller.stats.rx_seq_gaps == 0


async def test_rfc4733_late_end_packet_of_previous_key_is_not_a_new_press(make_server, sip_settings,
                                                                          prompt_pcm) -> None:
    """Keys 1 then 2; one of key 1's redundant end packets arrives after key 2 started (reordered or
    duplicated in the network). The bot must see "1", "2" — it used to see "1", "2", "1" (only the last event
    timestamp was remembered), which in a keypad menu is a wrong selection or an extra account digit."""
    from telephony.sip.dtmf import build_event
    from telephony.sip.rtp import build_rtp

    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    caller = SipCaller("127.0.0.1", srv.port)
    await caller.open()
    try:
        assert await caller.invite() == 200
        m = caller.media
        assert m.neg is not None and m.neg.dtmf_pt is not None and m._rtp is not None and m.remote is not None
        pt, ssrc, ts1, ts2 = m.neg.dtmf_pt, m.ssrc, 160_000, 162_400
        seq = [m._seq]

        def send(ts: int, digit: str, end: bool) -> None:
            m._rtp.sendto(build_rtp(pt, seq[0], ts, ssrc, build_event(digit, end, 800)), m.remote)
            seq[0] = (seq[0] + 1) & 0xFFFF

        send(ts1, "1", False)
        for _ in range(2):
            send(ts1, "1", True)
        send(ts2, "2", False)
        send(ts1, "1", True)  # key 1's last redundant end packet, late
        for _ in range(3):
            send(ts2, "2", True)
        await asyncio.sleep(0.5)
        assert await caller.bye() == 200
    finally:
        caller.close()
    await asyncio.wait_for(handler.call_ended.wait(), 5)
    assert handler.calls[0]["dtmf"] == ["1", "2"]


async def test_run_sip_call_records_bot(make_server, sip_settings, prompt_pcm, tmp_path) -> None:
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    out = tmp_path / "bot.wav"
    summary = await run_sip_call("127.0.0.1", srv.port, [prompt_pcm], out, greeting_wait_s=4, quiet_s=0.6,
                                 turn_wait_s=2)
    assert summary["answered"] and summary["hangup_by"] == "caller"
    assert summary["greeting_latency_s"] is not None and summary["greeting_latency_s"] < 2
    assert out.stat().st_size > 1000 and summary["bot_speech_s"] > 0.5


async def test_digest_auth_challenge_and_accept(make_server, sip_settings, prompt_pcm) -> None:
    handler = RecordingHandler(prompt_pcm)
    settings = dataclasses.replace(sip_settings, user="trunk", password="s3cret")
    srv = await make_server(handler, settings)
    bad = SipCaller("127.0.0.1", srv.port, auth=("trunk", "wrong"))
    await bad.open()
    try:
        assert await bad.invite() == 401
    finally:
        bad.close()
    good = SipCaller("127.0.0.1", srv.port, auth=("trunk", "s3cret"))
    await good.open()
    try:
        assert await good.invite() == 200
        await good.bye()
    finally:
        good.close()
    assert len(handler.calls) == 1


async def test_options_unknown_dialog_and_refusals(make_server, sip_settings, prompt_pcm) -> None:
    srv = await make_server(RecordingHandler(prompt_pcm), sip_settings)
    raw = RawUdp()
    try:
        resp = await raw.exchange(raw.request("OPTIONS", srv.port), srv.port)
        assert resp is not None and resp.status == 200 and "INVITE" in resp.get("Allow")
        resp = await raw.exchange(raw.request("BYE", srv.port, to_tag="nope", call_id="x"), srv.port)
        assert resp is not None and resp.status == 481
        resp = await raw.exchange(raw.request("CANCEL", srv.port, call_id="y"), srv.port)
        assert resp is not None and resp.status == 481
        g729 = b"v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 18\r\n"
        resp = await raw.exchange(raw.request("INVITE", srv.port, "Content-Type: application/sdp\r\n", g729,
                                              call_id="z"), srv.port)
        assert resp is not None and resp.status == 488
        resp = await raw.exchange(raw.request("REGISTER", srv.port, call_id="r"), srv.port)
        assert resp is not None and resp.status == 405
        resp = await raw.exchange(raw.request("FOO", srv.port, call_id="f"), srv.port)
        assert resp is not None and resp.status == 501
        # Scanners get silence.
        resp = await raw.exchange(raw.request("OPTIONS", srv.port, ua="friendly-scanner", call_id="s"), srv.port, 1.0)
        assert resp is None
    finally:
        raw.close()


async def test_refused_invites_are_logged_with_the_reason(make_server, sip_settings, prompt_pcm) -> None:
    """A trunk whose calls get 488 (only G.729 offered), 415 or 420 was counted but never logged: on-call saw
    voicebot_errors_total move with no trunk, Call-ID or reason to act on. Each refusal now logs one line."""
    from structlog.testing import capture_logs

    srv = await make_server(RecordingHandler(prompt_pcm), sip_settings)
    raw = RawUdp()
    g729 = b"v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 18\r\n"
    try:
        with capture_logs() as logs:
            resp = await raw.exchange(raw.request("INVITE", srv.port, "Content-Type: application/sdp\r\n", g729,
                                                  call_id="g729-call", ua="TrunkX/1.0"), srv.port)
            assert resp is not None and resp.status == 488
            resp = await raw.exchange(raw.request("INVITE", srv.port, "Content-Type: text/plain\r\n", b"hi",
                                                  call_id="text-call"), srv.port)
            assert resp is not None and resp.status == 415
            resp = await raw.exchange(raw.request("INVITE", srv.port, "Require: precondition\r\n", call_id="rel-call"),
                                      srv.port)
            assert resp is not None and resp.status == 420
    finally:
        raw.close()
    refused = {e["call_id"]: e for e in logs if e["event"] == "sip_invite_refused"}
    assert refused["g729-call"]["status"] == 488 and refused["g729-call"]["kind"] == "sdp_no_common_codec"
    assert refused["g729-call"]["source"] == "127.0.0.1" and refused["g729-call"]["user_agent"] == "TrunkX/1.0"
    assert refused["text-call"]["status"] == 415 and refused["rel-call"]["status"] == 420


async def test_uac_cancel_while_ringing_gets_487(make_server, sip_settings, prompt_pcm) -> None:
    """SipCaller.invite(cancel_after_s=...) as a caller who gives up while it rings: the CANCEL (same branch
    as the INVITE) gets its 200 and the INVITE its 487. Before, the CANCEL's transaction replaced the
    INVITE's (both keyed by branch), so the 487 was dropped and invite() reported 408 after 32 s."""
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, dataclasses.replace(sip_settings, ring_s=3.0))
    caller = SipCaller("127.0.0.1", srv.port)
    await caller.open()
    try:
        t0 = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(caller.invite(cancel_after_s=0.5), 5) == 487
        assert asyncio.get_running_loop().time() - t0 < 3.0
    finally:
        caller.close()
    await asyncio.sleep(3.0)  # past the ring time: the cancelled call is never answered nor handed over
    assert not handler.calls and not srv.calls and not srv._pending


async def test_tcp_options_and_framing(make_server, sip_settings, prompt_pcm) -> None:
    srv = await make_server(RecordingHandler(prompt_pcm), sip_settings)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    raw = RawUdp()
    try:
        # Two requests in one write, plus CRLF keep-alives: stream framing by Content-Length.
        a = raw.request("OPTIONS", srv.port, call_id="t1").replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP")
        b = raw.request("OPTIONS", srv.port, call_id="t2").replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP")
        writer.write(b"\r\n\r\n" + a + b)
        await writer.drain()
        seen = []
        while len(seen) < 2:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            msg = parse_message(head)
            seen.append((msg.status, msg.call_id))
        assert seen == [(200, "t1"), (200, "t2")]
    finally:
        writer.close()
        raw.close()


async def test_rate_limit_and_max_calls(make_server, sip_settings, prompt_pcm) -> None:
    settings = dataclasses.replace(sip_settings, invite_rate=0.01, invite_burst=2)
    srv = await make_server(RecordingHandler(prompt_pcm), settings)
    raw = RawUdp()
    sdp = (b"v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           b"m=audio 4000 RTP/AVP 18\r\n")
    try:
        codes = []
        for i in range(4):
            resp = await raw.exchange(raw.request("INVITE", srv.port, "Content-Type: application/sdp\r\n", sdp,
                                                  call_id=f"rl{i}"), srv.port)
            codes.append(resp.status if resp else None)
        assert codes[:2] == [488, 488] and codes[2:] == [503, 503]
    finally:
        raw.close()


async def test_rtp_timeout_ends_call(make_server, sip_settings, prompt_pcm) -> None:
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, dataclasses.replace(sip_settings, rtp_timeout_s=1.0))
    caller = SipCaller("127.0.0.1", srv.port)
    await caller.open()
    try:
        assert await caller.invite() == 200
        srv_call = await _first_call(handler)
        caller.media.close()  # the caller's media vanishes (crashed phone, dead NAT binding)
        await asyncio.wait_for(handler.call_ended.wait(), 10)
        assert handler.calls[0]["ended"] == "rtp_timeout"
        await asyncio.wait_for(caller.ended.wait(), 10)  # and we told the caller with BYE
        assert srv_call.state == "terminated"
    finally:
        caller.close()


async def _first_call(handler: RecordingHandler) -> Any:
    await asyncio.wait_for(handler.new_call.wait(), 5)
    return handler.calls[0]["bridge"]


async def test_refer_fallback_and_shutdown(make_server, sip_settings, prompt_pcm) -> None:
    """REFER to an unknown queue uses BOT_SIP_TRANSFER_FALLBACK; our UAC follows it to that SipServer."""
    async def escalate(bridge: CallBridge) -> bool:
        return await bridge.transfer("nosuchqueue", {})

    operator = RecordingHandler(np.zeros(800, dtype=np.int16))
    op_srv = await make_server(operator, sip_settings)
    handler = RecordingHandler(prompt_pcm, after_prompt=escalate)
    fallback = f"sip:operator@127.0.0.1:{op_srv.port}"
    srv = await make_server(handler, dataclasses.replace(sip_settings, transfer_fallback=fallback))
    caller = SipCaller("127.0.0.1", srv.port)
    await caller.open()
    try:
        assert await caller.invite() == 200
        await asyncio.wait_for(caller.ended.wait(), 15)
        assert caller.refer_to == fallback and caller.transfer_status == 200  # our UAC dialled the operator
        assert caller.hangup_by == "bot"
        await asyncio.wait_for(operator.new_call.wait(), 5)
        assert operator.calls[0]["bridge"].info.called == "operator"
        assert caller.transfer_call is not None and await caller.transfer_call.bye() == 200
    finally:
        if caller.transfer_call is not None:
            caller.transfer_call.close()
        caller.close()
    await asyncio.wait_for(handler.call_ended.wait(), 5)
    assert handler.calls[0]["ended"] == "transferred"

    # Graceful stop: new INVITEs get 503, live calls are ended with BYE after the grace period.
    plain = RecordingHandler(prompt_pcm)
    srv2 = await make_server(plain, sip_settings)
    c2 = SipCaller("127.0.0.1", srv2.port)
    await c2.open()
    try:
        assert await c2.invite() == 200
        await srv2.stop(grace_s=0.2)
        await asyncio.wait_for(c2.ended.wait(), 5)
        assert c2.hangup_by == "bot"
    finally:
        c2.close()


async def test_late_offer_invite(make_server, sip_settings, prompt_pcm) -> None:
    """INVITE without SDP: the bot offers in the 200 OK, the caller answers in the ACK; media flows."""
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    caller = SipCaller("127.0.0.1", srv.port, codecs=("PCMA",))
    await caller.open()
    try:
        assert await caller.invite(late_offer=True) == 200
        call = await _first_call(handler)
        await wait_until(lambda: call.media.neg is not None and call.media.stats["rx"] > 20, 5)
        assert call.media.neg.codec == "PCMA"  # the caller's answer chose PCMA from our offer
        await caller.wait_bot_quiet(0.3, 5)
        assert voiced_fraction(caller.recorded()) > 0.05
        assert await caller.bye() == 200
    finally:
        caller.close()
    await asyncio.wait_for(handler.call_ended.wait(), 5)


async def test_reinvite_hold_codec_change_and_busy(make_server, sip_settings, prompt_pcm) -> None:
    handler = RecordingHandler(np.tile(prompt_pcm, 4))
    srv = await make_server(handler, dataclasses.replace(sip_settings, max_calls=1))
    caller = SipCaller("127.0.0.1", srv.port, codecs=("PCMU",))
    await caller.open()
    try:
        assert await caller.invite() == 200
        call = await _first_call(handler)
        # A second caller finds the bot at capacity: 486 Busy Here.
        other = SipCaller("127.0.0.1", srv.port)
        await other.open()
        try:
            assert await other.invite() == 486
        finally:
            other.close()
        assert await caller.reinvite("sendonly") == 200  # caller holds: we stop sending
        assert call.media.neg.direction == "recvonly"
        tx_on_hold = call.media.stats["tx"]
        await asyncio.sleep(0.4)
        assert call.media.stats["tx"] == tx_on_hold
        assert await caller.reinvite("sendrecv", codecs=("PCMA",)) == 200  # resume with another codec
        assert (call.media.neg.direction, call.media.neg.codec) == ("sendrecv", "PCMA")
        assert caller.media.neg is not None and caller.media.neg.codec == "PCMA"
        before = len(handler.calls[0]["audio"])
        await wait_until(lambda: call.media.stats["tx"] > tx_on_hold + 20, 5)
        await wait_until(lambda: len(handler.calls[0]["audio"]) > before + 20, 5)
        # An offer we cannot accept is refused and changes nothing (RFC 3264 8).
        caller.codecs = ("G729",)  # type: ignore[assignment]
        req = caller._request("INVITE", b"v=0\r\no=x 1 2 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                              b"m=audio 4000 RTP/AVP 18\r\n", [("Content-Type", "application/sdp")])
        resp = await caller._transact(req, 5)
        assert resp is not None and resp.status == 488
        caller._send_ack(resp, req)
        assert call.media.neg.codec == "PCMA" and call.state == "confirmed"
        assert await caller.bye() == 200
    finally:
        caller.close()


async def test_200_ok_retransmitted_until_ack(make_server, sip_settings, prompt_pcm) -> None:
    """RFC 3261 13.3.1.4: over UDP the 2xx is repeated (T1, 2*T1, ...) until the ACK arrives."""
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    raw = RawUdp()
    loop = asyncio.get_running_loop()
    sdp = (b"v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           b"m=audio 4000 RTP/AVP 0\r\n")
    try:
        invite = raw.request("INVITE", srv.port, f"Content-Type: application/sdp\r\nContact: <sip:raw@127.0.0.1:{raw.port}>\r\n",
                             sdp, call_id="rtx-1")
        raw.sock.sendto(invite, ("127.0.0.1", srv.port))
        oks: list[SipMessage] = []
        deadline = loop.time() + 2.2  # 200 at t=0, then ~0.5, ~1.5 s
        while loop.time() < deadline:
            try:
                msg = parse_message(await asyncio.wait_for(loop.sock_recv(raw.sock, 65536), deadline - loop.time()))
            except asyncio.TimeoutError:
                break
            if msg.status == 200:
                oks.append(msg)
        assert len(oks) >= 2 and len({m.to_tag for m in oks}) == 1
        ack = (f"ACK sip:bot@127.0.0.1:{srv.port} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{raw.port};branch={new_branch()}\r\n"
               f"From: <sip:raw@127.0.0.1>;tag=abc\r\nTo: <sip:bot@127.0.0.1>;tag={oks[0].to_tag}\r\n"
               f"Call-ID: rtx-1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n").encode()
        raw.sock.sendto(ack, ("127.0.0.1", srv.port))
        await asyncio.sleep(0.2)
        call = await _first_call(handler)
        assert call.acked.is_set()
        late: list[int] = []
        deadline = loop.time() + 2.5  # no more 200s once ACKed (RTP goes elsewhere: port 4000)
        while loop.time() < deadline:
            try:
                late.append(parse_message(await asyncio.wait_for(loop.sock_recv(raw.sock, 65536),
                                                                  deadline - loop.time())).status)
            except asyncio.TimeoutError:
                break
        assert 200 not in late
        bye_task = asyncio.ensure_future(call.hangup("completed"))  # our BYE goes to the Contact
        bye = parse_message(await asyncio.wait_for(loop.sock_recv(raw.sock, 65536), 5))
        assert bye.method == "BYE" and bye.to_tag == "abc" and bye.from_tag == oks[0].to_tag
        raw.sock.sendto(make_response(bye, 200).encode(), ("127.0.0.1", srv.port))
        await asyncio.wait_for(bye_task, 5)
    finally:
        raw.close()


@pytest.mark.parametrize("srtp", [False, True])
async def test_bot_call_sip_cli(make_server, sip_settings, prompt_pcm, tmp_path, srtp: bool) -> None:
    """`bot call --sip HOST:PORT WAV --record OUT [--srtp]` prints a JSON summary and records the bot."""
    import json
    import sys

    from tests.conftest import ROOT

    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    out = tmp_path / "bot.wav"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "call", "--sip", f"sip:bot@127.0.0.1:{srv.port}",
        "/usr/share/asterisk/sounds/en/hello-world.wav", "--record", str(out), "--reply-timeout", "2",
        *(["--srtp"] if srtp else []),
        cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    summary = json.loads(stdout)
    assert summary["answered"] and summary["bot_speech_s"] > 0.5 and out.stat().st_size > 1000
    assert summary["srtp"] == ("AES_CM_128_HMAC_SHA1_80" if srtp else None)
    assert (handler.calls[0]["bridge"].media.srtp is not None) == srtp
    await asyncio.wait_for(handler.call_ended.wait(), 5)
    assert voiced_fraction(inbound_pcm(handler.calls[0])) > 0.1  # the WAV turn reached the bot


async def test_record_route_bye_goes_through_proxy(make_server, sip_settings, prompt_pcm) -> None:
    """Behind a proxy (e.g. Kamailio) the dialog's route set applies: our BYE is sent to the
    Record-Route hop with a Route header, addressed to the caller's Contact."""
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    proxy = RawUdp()
    loop = asyncio.get_running_loop()
    sdp = b"v=0\r\no=x 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
    rr = f"<sip:127.0.0.1:{proxy.port};lr>"
    try:
        invite = proxy.request("INVITE", srv.port, f"Content-Type: application/sdp\r\nRecord-Route: {rr}\r\n"
                               "Contact: <sip:alice@192.0.2.55:5070>\r\n", sdp, call_id="rr-1")
        ok = await proxy.exchange(invite, srv.port)
        assert ok is not None and ok.status == 200 and ok.get("Record-Route") == rr
        ack = (f"ACK sip:alice@192.0.2.55:5070 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{proxy.port};branch={new_branch()}\r\n"
               f"From: <sip:raw@127.0.0.1>;tag=abc\r\nTo: <sip:bot@127.0.0.1>;tag={ok.to_tag}\r\n"
               f"Call-ID: rr-1\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n").encode()
        proxy.sock.sendto(ack, ("127.0.0.1", srv.port))
        call = await _first_call(handler)
        await wait_until(lambda: call.acked.is_set(), 5)
        bye_task = asyncio.ensure_future(call.hangup("completed"))
        while True:
            bye = parse_message(await asyncio.wait_for(loop.sock_recv(proxy.sock, 65536), 5))
            if bye.method == "BYE":
                break
        assert bye.uri == "sip:alice@192.0.2.55:5070" and bye.get("Route") == rr
        proxy.sock.sendto(make_response(bye, 200).encode(), ("127.0.0.1", srv.port))
        await asyncio.wait_for(bye_task, 5)
    finally:
        proxy.close()


async def test_refer_failure_keeps_call(make_server, sip_settings, prompt_pcm) -> None:
    """The transfer target never answers: NOTIFY carries the failure, transfer() returns False, the
    caller stays with the bot (the conversation apologises), and the result is counted."""
    from ops.metrics import TRANSFERS

    async def escalate(bridge: CallBridge) -> bool:
        return await bridge.transfer("billing", {})

    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))  # a port where nobody answers SIP
    handler = RecordingHandler(prompt_pcm, after_prompt=escalate)
    settings = dataclasses.replace(sip_settings, queue_uris={"billing": f"sip:billing@127.0.0.1:{dead.getsockname()[1]}"})
    srv = await make_server(handler, settings)
    failed_before = TRANSFERS.labels("sip", "billing", "failed")._value.get()
    caller = SipCaller("127.0.0.1", srv.port)
    caller.refer_dial_timeout_s = 1.5
    await caller.open()
    try:
        assert await caller.invite() == 200
        await wait_until(lambda: handler.calls and "action_task" in handler.calls[0], 10)
        await asyncio.wait_for(handler.calls[0]["action_task"], 15)
        assert handler.calls[0]["action"] is False and caller.transfer_status == 408
        assert handler.calls[0]["bridge"].state == "confirmed" and not caller.ended.is_set()
        assert TRANSFERS.labels("sip", "billing", "failed")._value.get() == failed_before + 1
        assert await caller.bye() == 200
    finally:
        dead.close()
        caller.close()


async def test_transfer_with_fallback_finishes_inside_the_conversations_wait(
        make_server, sip_settings, prompt_pcm, monkeypatch) -> None:
    """The queue's REFER is accepted but its target keeps ringing (no final NOTIFY), and a fallback is
    configured: the conversation cancels transfer() after 10 s, so primary + fallback must fit in
    TRANSFER_BUDGET_S. Before, transfer() took 8 s + the fallback's ringing: the conversation gave up
    mid-fallback (apology while the phone was still being transferred, outcome transfer_failed, the fallback
    attempt never counted). Scaled down here: a 2 s budget with the default 8 s NOTIFY timeout."""
    from ops.metrics import ERRORS, TRANSFERS
    from telephony.sip import call as sip_call

    monkeypatch.setattr(sip_call, "TRANSFER_BUDGET_S", 2.0)
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))  # the queue's phone never answers: the transferee keeps dialling it
    operator = RecordingHandler(np.zeros(800, dtype=np.int16))
    op_srv = await make_server(operator, sip_settings)

    async def escalate(bridge: CallBridge) -> tuple[bool, float]:
        t0 = asyncio.get_running_loop().time()
        ok = await asyncio.wait_for(bridge.transfer("billing", {}), timeout=2.5)  # the conversation's cap, scaled
        return ok, asyncio.get_running_loop().time() - t0

    handler = RecordingHandler(prompt_pcm, after_prompt=escalate)
    settings = dataclasses.replace(
        sip_settings, transfer_timeout_s=8.0,
        queue_uris={"billing": f"sip:billing@127.0.0.1:{dead.getsockname()[1]}"},
        transfer_fallback=f"sip:operator@127.0.0.1:{op_srv.port}")
    srv = await make_server(handler, settings)
    failed_before = TRANSFERS.labels("sip", "billing", "failed")._value.get()
    timeouts_before = ERRORS.labels("sip", "refer_timeout")._value.get()
    caller = SipCaller("127.0.0.1", srv.port)
    caller.refer_dial_timeout_s = 3.0
    await caller.open()
    try:
        assert await caller.invite() == 200
        await wait_until(lambda: handler.calls and "action_task" in handler.calls[0], 10)
        await asyncio.wait_for(handler.calls[0]["action_task"], 5)  # not cancelled by the 2.5 s cap
        ok, took = handler.calls[0]["action"]
        assert ok is False and took < 2.4
        assert TRANSFERS.labels("sip", "billing", "failed")._value.get() == failed_before + 1
        assert ERRORS.labels("sip", "refer_timeout")._value.get() == timeouts_before + 1
        assert caller.refer_to.startswith("sip:billing@")  # no second REFER without the time to finish it
        assert handler.calls[0]["bridge"].state == "confirmed" and not caller.ended.is_set()
        await wait_until(lambda: caller.transfer_status is not None, 5)  # let the UAC's dial attempt end
        assert await caller.bye() == 200
    finally:
        dead.close()
        caller.close()
    assert not operator.calls


async def test_transfer_with_no_queue_uri_is_counted_and_keeps_call(make_server, sip_settings, prompt_pcm) -> None:
    """No URI for the queue and no fallback: nothing is sent, transfer() returns False at once, the caller
    stays with the bot, and on-call sees it as result="unconfigured" (as on Twilio)."""
    from ops.metrics import TRANSFERS

    async def escalate(bridge: CallBridge) -> bool:
        return await bridge.transfer("retention", {})

    handler = RecordingHandler(prompt_pcm, after_prompt=escalate)
    srv = await make_server(handler, sip_settings)  # queue_uris={} and no fallback
    before = TRANSFERS.labels("sip", "retention", "unconfigured")._value.get()
    caller = SipCaller("127.0.0.1", srv.port)
    await caller.open()
    try:
        assert await caller.invite() == 200
        await wait_until(lambda: handler.calls and "action_task" in handler.calls[0], 10)
        await asyncio.wait_for(handler.calls[0]["action_task"], 5)
        assert handler.calls[0]["action"] is False and caller.refer_to is None and not caller.ended.is_set()
        assert TRANSFERS.labels("sip", "retention", "unconfigured")._value.get() == before + 1
        assert await caller.bye() == 200
    finally:
        caller.close()


def test_bot_call_sip_adds_the_bots_decisions_from_redis(redis_url: str) -> None:
    """`bot call --sip` reads what the bot understood and decided per turn from the bot's Redis, as the
    Twilio path does; without a record (or a Redis) the summary is left as it was."""
    from bot.state import CallStore, connect
    from telephony.sip.uac import _add_decisions

    async def write() -> None:
        store = CallStore(connect(redis_url), worker="test", ttl_s=60)
        await store.start()
        store.start_call("sip-dec-1@127.0.0.1", "sip", "caller", "bot", "1")
        store.event("sip-dec-1@127.0.0.1", "turn", n=1, intent="pay_bill", confidence=0.97, transcript="pay my bill",
                    decision={"action": "collect", "reason": "slot_missing", "prompt": "How much?"})
        store.event("sip-dec-1@127.0.0.1", "first_audio", turn=1, latency_ms=21.5)
        store.end_call("sip-dec-1@127.0.0.1", "caller_hangup")
        await store.close()

    asyncio.run(write())
    summary: dict = {"call_id": "sip-dec-1@127.0.0.1", "answered": True}
    _add_decisions(summary, redis_url)
    assert summary["outcome"] == "caller_hangup"
    assert [(t["n"], t["intent"], t["action"], t["reason"], t["server_latency_ms"]) for t in summary["turns"]] == [
        (1, "pay_bill", "collect", "slot_missing", 21.5)]
    other: dict = {"call_id": "no-such-call", "answered": True}
    _add_decisions(other, redis_url)
    assert other == {"call_id": "no-such-call", "answered": True}


async def test_a_draining_worker_refuses_new_invites_while_its_calls_go_on(make_server, sip_settings,
                                                                            prompt_pcm) -> None:
    """SIGTERM starts the drain: from then on an INVITE gets 503 + Retry-After (a trunk or Kamailio tries
    another worker), not a 200 OK and an immediate BYE; the call already up is not touched."""
    from bot.conversation_manager import CallManager
    from bot.sip_listener import SipListener

    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    listener = SipListener(lambda: srv)
    listener.server = srv  # started by the fixture
    calls = CallManager(None)  # type: ignore[arg-type] - no call of its own: only the drain hooks are used
    calls.on_drain.append(listener.refuse_new_calls)
    live, late = SipCaller("127.0.0.1", srv.port), RawUdp()
    await live.open()
    try:
        assert await live.invite() == 200
        await calls.drain(0.1)
        resp = await late.exchange(late.request("INVITE", srv.port, call_id="late-1"), srv.port)
        assert resp is not None and resp.status == 503 and resp.get("Retry-After")
        await asyncio.sleep(0.3)
        assert not live.ended.is_set()  # the live call carries on through the drain
    finally:
        live.close()
        late.close()


async def test_a_call_over_ipv6(sip_settings, prompt_pcm) -> None:
    """A SIP server bound to an IPv6 address: its Via, Contact and Referred-By put the address in brackets (it wrote
    `::1:5060`, which no phone can parse), the SDP says IN IP6, audio flows both ways and the BYE finds the dialog."""
    from telephony.sip.server import SipServer

    handler = RecordingHandler(prompt_pcm)
    srv = SipServer("::1", 0, handler, dataclasses.replace(sip_settings, allow="::1/128"))
    await srv.start()
    tone = (6000 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.int16)
    caller = SipCaller("::1", srv.port)
    await caller.open()
    try:
        assert await caller.invite() == 200, caller.error
        ok = caller._ok_response
        assert ok is not None and f"<sip:bot@[::1]:{srv.port}>" in ok.get("Contact"), ok.encode()
        assert b"c=IN IP6 ::1" in ok.body, ok.body
        await caller.play(tone, "t")
        await caller.wait_bot_quiet(0.5, 5)
        assert await caller.bye() == 200
        await asyncio.wait_for(handler.call_ended.wait(), 5)
    finally:
        caller.close()
        await srv.stop()
    assert voiced_fraction(inbound_pcm(handler.calls[0]), 1000) > 0.1
    assert voiced_fraction(caller.recorded()) > 0.05


async def test_a_server_on_every_address_takes_ipv4_and_ipv6_calls(sip_settings, prompt_pcm) -> None:
    """Bound to `::` (dual-stack): an IPv6 phone's audio has an IPv6 RTP socket to reach (RTP was bound on IPv4 only,
    and the bot never heard it), and an IPv4 phone is answered as IPv4, `c=IN IP4` with its own address (it was
    `IN IP6 ::ffff:127.0.0.1`, which an IPv4-only phone cannot use), both ways over the one SIP socket."""
    from telephony.sip.server import SipServer

    handler = RecordingHandler(np.tile(prompt_pcm, 2))
    srv = SipServer("::", 0, handler, dataclasses.replace(sip_settings, allow="127.0.0.0/8,::1/128"))
    await srv.start()
    tone = (6000 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.int16)
    try:
        for i, (host, sdp_c, family) in enumerate([("::1", b"c=IN IP6 ::1", socket.AF_INET6),
                                                   ("127.0.0.1", b"c=IN IP4 127.0.0.1", socket.AF_INET)]):
            caller = SipCaller(host, srv.port)
            await caller.open()
            try:
                assert await caller.invite() == 200, caller.error
                assert caller._ok_response is not None and sdp_c in caller._ok_response.body
                await wait_until(lambda: len(handler.calls) == i + 1, 5)
                call = handler.calls[i]["bridge"]
                assert call.peer.addr[0] == host and call.media._rtp.get_extra_info("socket").family == family
                await caller.play(tone, "t")
                await caller.wait_bot_quiet(0.5, 8)
                assert await caller.bye() == 200
            finally:
                caller.close()
            assert voiced_fraction(inbound_pcm(handler.calls[i]), 1000) > 0.1, host  # the bot heard the caller
            assert voiced_fraction(caller.recorded()) > 0.05, host  # and the caller heard the bot
    finally:
        await srv.stop()


async def test_a_server_on_every_address_takes_tcp_from_both_families(sip_settings, prompt_pcm) -> None:
    """asyncio makes a listener on `::` IPv6-only: IPv4 phones were refused over TCP (and TLS) while UDP took them."""
    from telephony.sip.server import SipServer

    srv = SipServer("::", 0, RecordingHandler(prompt_pcm), dataclasses.replace(sip_settings, allow="127.0.0.0/8,::1/128"))
    await srv.start()
    raw = RawUdp()
    try:
        for host in ("127.0.0.1", "::1"):
            reader, writer = await asyncio.open_connection(host, srv.port)
            try:
                req = raw.request("OPTIONS", srv.port, call_id=f"tcp-{host}").replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP")
                writer.write(req)
                await writer.drain()
                resp = parse_message(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5))
                assert (resp.status, resp.call_id) == (200, f"tcp-{host}")
                assert any(a[0] == host for a in srv._tcp_conns), srv._tcp_conns  # admitted as itself, unmapped
            finally:
                writer.close()
    finally:
        raw.close()
        await srv.stop()
