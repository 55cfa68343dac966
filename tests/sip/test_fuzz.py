"""Bad input: generated fuzz of every parser, and a live call that keeps its audio while garbage is
thrown at the SIP and RTP ports."""

from __future__ import annotations

import asyncio
import os
import random
import socket

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from ops.metrics import ERRORS
from telephony.sip.dtmf import DtmfError, parse_event, parse_info_body
from telephony.sip.message import SipParseError, parse_message
from telephony.sip.rtp import RtpError, build_rtp, parse_rtcp, parse_rtp
from telephony.sip.sdp import SdpError, negotiate, parse_sdp
from telephony.sip.uac import SipCaller

from .conftest import RecordingHandler, wait_until
from .test_units import INVITE, OFFER

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _mutate(data: bytes, rnd: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 8)):
        op = rnd.randrange(4)
        pos = rnd.randrange(len(b) + 1)
        if op == 0 and b:
            del b[pos:pos + rnd.randint(1, 20)]
        elif op == 1:
            b[pos:pos] = os.urandom(rnd.randint(1, 10))
        elif op == 2 and b:
            b[min(pos, len(b) - 1)] = rnd.randrange(256)
        else:
            b = b[:pos]
    return bytes(b)


@FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_sip_parser_random_bytes(data: bytes) -> None:
    try:
        parse_message(data)
    except SipParseError:
        pass


@FUZZ
@given(st.integers(min_value=0, max_value=2**32))
def test_fuzz_sip_parser_mutated_invite(seed: int) -> None:
    try:
        parse_message(_mutate(INVITE, random.Random(seed)))
    except SipParseError:
        pass


@FUZZ
@given(st.integers(min_value=0, max_value=2**32))
def test_fuzz_sdp_mutated_offer(seed: int) -> None:
    try:
        negotiate(parse_sdp(_mutate(OFFER, random.Random(seed))))
    except SdpError:
        pass


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_rtp_rtcp_dtmf(data: bytes) -> None:
    for fn, err in ((parse_rtp, RtpError), (parse_rtcp, RtpError), (parse_event, DtmfError)):
        try:
            fn(data)
        except err:
            pass
    try:
        parse_info_body("application/dtmf-relay", data)
    except DtmfError:
        pass


def _garbage_corpus(port: int) -> list[bytes]:
    base = INVITE.replace(b"sip:bot@10.0.0.1:5060", f"sip:bot@127.0.0.1:{port}".encode())
    return [
        base[:60],  # truncated
        base.replace(b"l: 4", b"l: 9999"),  # bad Content-Length
        base.replace(b"CSeq: 314159 INVITE", b"CSeq: 1 BYE"),  # wrong CSeq
        base.replace(b"Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK776;rport\r\n", b"")
            .replace(b"v: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKold\r\n", b""),  # missing Via
        b"INVITE sip:x SIP/2.0\r\nX: " + b"A" * 60000 + b"\r\n\r\n",  # huge header
        os.urandom(1200),  # binary garbage
        b"\r\n\r\n",  # keep-alive
        b"SIP/2.0 200 OK\r\n\r\n",  # stray response
    ]


async def test_call_keeps_audio_under_garbage(make_server, sip_settings, prompt_pcm) -> None:
    handler = RecordingHandler(np.tile(prompt_pcm, 5))
    srv = await make_server(handler, sip_settings)
    caller = SipCaller("127.0.0.1", srv.port)
    await caller.open()
    errors_before = ERRORS.labels("sip", "bad_content_length")._value.get()
    rtp_errors_before = ERRORS.labels("rtp", "bad_version")._value.get()
    tone = (6000 * np.sin(2 * np.pi * 440 * np.arange(8000 * 4) / 8000)).astype(np.int16)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    try:
        assert await caller.invite() == 200
        await asyncio.wait_for(handler.new_call.wait(), 5)
        call = handler.calls[0]["bridge"]
        caller.media.queue_audio(tone)
        rx0, in0 = caller.stats.rx_packets, len(handler.calls[0]["audio"])
        rtp_port = call.media.local_port
        rnd = random.Random(7)
        bad_rtp = [b"\x40" + os.urandom(30), b"\x80", build_rtp(99, 5, 5, 5, b"x" * 160),
                   build_rtp(0, 30000, 1, caller.media.ssrc, b"\xff" * 160), b"\x80\xc8" + os.urandom(40)]
        for i in range(150):  # ~3 s of garbage, interleaved with the live call
            for data in _garbage_corpus(srv.port):
                udp.sendto(data, ("127.0.0.1", srv.port))
            udp.sendto(rnd.choice(bad_rtp), ("127.0.0.1", rtp_port))
            udp.sendto(os.urandom(rnd.randint(0, 300)), ("127.0.0.1", rtp_port + 1))
            await asyncio.sleep(0.02)
        # 400 Bad Request for requests intact enough to answer (RFC 3261 8.2), nothing for the rest.
        loop = asyncio.get_running_loop()
        statuses = []
        while True:
            try:
                statuses.append(parse_message(await asyncio.wait_for(loop.sock_recv(udp, 65536), 0.5)).status)
            except asyncio.TimeoutError:
                break
        assert statuses and set(statuses) == {400}
        # The call kept flowing both ways the whole time (150 ticks ~ 3 s; allow for a slow CI box).
        assert caller.stats.rx_packets - rx0 >= 100
        await wait_until(lambda: len(handler.calls[0]["audio"]) - in0 >= 100, 5)
        assert caller.stats.rx_seq_gaps == 0
        assert call.state == "confirmed" and call.media.remote == ("127.0.0.1", caller.media.local_port)
        assert await caller.bye() == 200
    finally:
        udp.close()
        caller.close()
    assert ERRORS.labels("sip", "bad_content_length")._value.get() > errors_before
    assert ERRORS.labels("rtp", "bad_version")._value.get() > rtp_errors_before


async def test_tcp_garbage_closes_only_that_connection(make_server, sip_settings, prompt_pcm) -> None:
    srv = await make_server(RecordingHandler(prompt_pcm), sip_settings)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(os.urandom(70000).replace(b"\r\n\r\n", b"xxxx"))  # never a header end, over the size cap
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the server dropped the broken stream
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        opt = (f"OPTIONS sip:bot@127.0.0.1:{srv.port} SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:1;branch=z9hG4bKt\r\n"
               "From: <sip:a@b>;tag=1\r\nTo: <sip:bot@127.0.0.1>\r\nCall-ID: tcp-ok\r\nCSeq: 1 OPTIONS\r\n"
               "Content-Length: 0\r\n\r\n").encode()
        writer.write(opt)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert parse_message(head).status == 200
    finally:
        writer.close()
