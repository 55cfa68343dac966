"""Pure-function pieces of the SIP stack: parsing, SDP negotiation, RTP, jitter buffer, DTMF, auth."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from telephony.sip.auth import Allowlist, DigestAuth, TokenBucket, authorization_header, is_scanner, parse_digest
from telephony.sip.call import resolve_target
from telephony.sip.config import parse_queue_uris
from telephony.sip.dtmf import DtmfError, EventDetector, build_event, parse_event, parse_info_body
from telephony.sip.jitter import Concealer, JitterBuffer, Slot
from telephony.sip.message import (
    SipParseError, addr_uri, find_message_end, header_params, make_response, parse_message, parse_uri, split_commas,
)
from telephony.sip.rtp import RtpError, build_rtp, build_sender_report, parse_rtcp, parse_rtp, seq_delta
from telephony.sip.sdp import SdpError, SdpSession, negotiate, parse_sdp
from telephony.sip.srtp import Crypto, SrtpContext, SrtpError, new_key, parse_crypto

INVITE = (b"INVITE sip:bot@10.0.0.1:5060 SIP/2.0\r\n"
          b"Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK776;rport\r\n"
          b"v: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKold\r\n"
          b"f: \"Alice, A\" <sip:+15551234567@10.0.0.2>;tag=1928\r\n"
          b"t: <sip:bot@10.0.0.1>\r\n"
          b"i: a84b4c76e66710\r\n"
          b"CSeq: 314159 INVITE\r\n"
          b"Contact: <sip:alice@10.0.0.2:5062>\r\n"
          b"Subject: folded\r\n header line\r\n"
          b"Content-Type: application/sdp\r\n"
          b"l: 4\r\n\r\nbodyEXTRA")


def test_parse_invite_compact_folded_and_body_length() -> None:
    m = parse_message(INVITE)
    assert m.method == "INVITE" and m.call_id == "a84b4c76e66710" and m.cseq == (314159, "INVITE")
    assert m.branch == "z9hG4bK776" and len(m.get_all("Via")) == 2
    assert m.from_tag == "1928" and m.to_tag == ""
    assert m.get("Subject") == "folded header line"
    assert m.body == b"body"  # Content-Length wins over trailing bytes
    assert addr_uri(m.get("From")) == "sip:+15551234567@10.0.0.2"
    r = make_response(m, 180, to_tag="xyz")
    again = parse_message(r.encode())
    assert again.status == 180 and again.to_tag == "xyz" and again.branch == "z9hG4bK776"


@pytest.mark.parametrize("data,kind", [
    (b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z\r\n", "truncated"),
    (INVITE.replace(b"l: 4", b"l: 400"), "bad_content_length"),
    (INVITE.replace(b"l: 4", b"l: -1"), "bad_content_length"),
    (INVITE.replace(b"CSeq: 314159 INVITE", b"CSeq: 314159 BYE"), "cseq_method_mismatch"),
    (INVITE.replace(b"CSeq: 314159 INVITE", b"CSeq: abc INVITE"), "bad_cseq"),
    (INVITE.replace(b"Via: SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK776;rport\r\nv: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKold\r\n", b""), "missing_via"),
    (INVITE.replace(b"i: a84b4c76e66710\r\n", b""), "missing_call_id"),
    (INVITE.replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1), "bad_request_line"),
    (b"\xff\xfe\x00garbage\r\n\r\n", "bad_encoding"),
    (b"INVITE sip:x SIP/2.0\r\n" + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", "header_too_long"),
    (b"INVITE sip:x SIP/2.0\r\n" + b"X-A: 1\r\n" * 300 + b"\r\n", "too_many_headers"),
    (b"x" * 70000, "too_large"),
    (INVITE.replace(b"Via: SIP/2.0/UDP 10.0.0.2", b"Via: garbage"), "bad_via"),
    (INVITE.replace(b"INVITE sip:bot@10.0.0.1:5060 SIP", b"INVITE http://x SIP"), "bad_request_uri"),
    (INVITE.replace(b"Contact:", b"Bad Header Name:"), "bad_header"),
])
def test_malformed_messages_raise_kind(data: bytes, kind: str) -> None:
    with pytest.raises(SipParseError) as exc:
        parse_message(data)
    assert exc.value.kind == kind


def test_stream_framing_and_helpers() -> None:
    assert find_message_end(INVITE[:50]) is None
    hdr_end, total = find_message_end(INVITE)  # type: ignore[misc]
    assert INVITE[total - 4:total] == b"body"
    assert split_commas('"a, b" <sip:x>, <sip:y;lr>') == ['"a, b" <sip:x>', "<sip:y;lr>"]
    assert header_params("<sip:x;transport=tcp>;tag=9;lr") == {"tag": "9", "lr": ""}
    u = parse_uri("sip:billing@[::1]:5090;transport=TCP")
    assert (u.user, u.host, u.port, u.transport) == ("billing", "::1", 5090, "tcp")
    with pytest.raises(SipParseError):
        parse_uri("sip:x@host:99999")


OFFER = (b"v=0\r\no=- 1 1 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\n"
         b"m=video 5000 RTP/AVP 96\r\n"
         b"m=audio 4000 RTP/AVP 9 8 0 101\r\na=rtpmap:101 telephone-event/8000\r\na=ptime:20\r\na=sendonly\r\n")


def test_sdp_negotiation_prefers_offer_order_and_mirrors_direction() -> None:
    offer = parse_sdp(OFFER)
    neg, idx = negotiate(offer)
    assert (neg.codec, neg.pt, neg.dtmf_pt, neg.direction, idx) == ("PCMA", 8, 101, "recvonly", 1)
    assert (neg.remote_ip, neg.remote_port) == ("10.0.0.2", 4000)
    answer = SdpSession("10.0.0.1").answer(offer, neg, idx, 20000).decode()
    assert "m=video 0 RTP/AVP 96" in answer and "m=audio 20000 RTP/AVP 8 101" in answer and "a=recvonly" in answer
    back, _ = negotiate(parse_sdp(answer.encode()))
    assert back.codec == "PCMA"
    hold = parse_sdp(OFFER.replace(b"c=IN IP4 10.0.0.2", b"c=IN IP4 0.0.0.0").replace(b"a=sendonly", b"a=sendrecv"))
    assert negotiate(hold)[0].direction == "recvonly"  # RFC 2543-style hold


@pytest.mark.parametrize("body,kind", [
    (b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 18\r\n", "no_common_codec"),
    (b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/SAVP 0\r\n", "srtp_no_usable_crypto"),
    (b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/SAVP 0\r\na=crypto:1 F8_128_HMAC_SHA1_80 inline:"
     + b"A" * 40 + b"\r\n", "srtp_no_usable_crypto"),
    (b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/SAVP 0\r\na=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:short\r\n",
     "srtp_crypto_malformed"),
    (b"v=0\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/SAVP 0\r\na=crypto:x\r\n", "srtp_crypto_malformed"),
    (b"v=0\r\nm=audio 4000 RTP/AVP 0\r\n", "missing_connection"),
    # an FQDN would be resolved by a blocking sendto() per RTP packet, on the loop all calls share
    (b"v=0\r\nc=IN IP4 media.example.com\r\nm=audio 4000 RTP/AVP 0\r\n", "connection_not_ip"),
    (b"c=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\n", "missing_version"),
    (b"v=0\r\nthis is not sdp\r\n", "bad_line"),
    (b"v=0\r\nm=audio port RTP/AVP 0\r\n", "bad_media"),
])
def test_sdp_refusals(body: bytes, kind: str) -> None:
    with pytest.raises(SdpError) as exc:
        negotiate(parse_sdp(body))
    assert exc.value.kind == kind


KEY80 = bytes(range(30))
SRTP_OFFER = (b"v=0\r\no=- 1 1 IN IP4 10.0.0.2\r\ns=-\r\nc=IN IP4 10.0.0.2\r\nt=0 0\r\n"
              b"m=audio 4000 RTP/SAVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n"
              b"a=crypto:1 AES_CM_128_HMAC_SHA1_32 inline:" + Crypto(1, "AES_CM_128_HMAC_SHA1_32", KEY80).attribute()
              .split("inline:")[1].encode() + b"|2^31\r\n"
              b"a=crypto:2 AES_CM_128_HMAC_SHA1_80 inline:" + Crypto(2, "AES_CM_128_HMAC_SHA1_80", KEY80).attribute()
              .split("inline:")[1].encode() + b"|2^20|1:4\r\n"  # an MKI: not usable
              b"a=crypto:3 AES_CM_128_HMAC_SHA1_80 inline:" + Crypto(3, "AES_CM_128_HMAC_SHA1_80", KEY80).attribute()
              .split("inline:")[1].encode() + b"\r\n")


def test_sdes_offer_answered_with_our_key_for_the_preferred_usable_suite() -> None:
    offer = parse_sdp(SRTP_OFFER)
    neg, idx = negotiate(offer)
    assert neg.crypto == Crypto(3, "AES_CM_128_HMAC_SHA1_80", KEY80) and neg.proto == "RTP/SAVP"
    ours = new_key("AES_CM_128_HMAC_SHA1_80")
    answer = SdpSession("10.0.0.1").answer(offer, neg, idx, 20000, ours).decode()
    assert "m=audio 20000 RTP/SAVP 0 101" in answer
    back, _ = negotiate(parse_sdp(answer.encode()))  # the offerer reads our line: tag 3, our key
    assert back.crypto == Crypto(3, "AES_CM_128_HMAC_SHA1_80", ours)
    with pytest.raises(ValueError):
        SdpSession("10.0.0.1").answer(offer, neg, idx, 20000)  # an SRTP answer without our key
    # the modes: off skips SRTP streams, required skips plain ones
    with pytest.raises(SdpError) as exc:
        negotiate(offer, srtp="off")
    assert exc.value.kind == "srtp_off"
    with pytest.raises(SdpError) as exc:
        negotiate(parse_sdp(OFFER), srtp="required")
    assert exc.value.kind == "srtp_required"
    # best-effort SRTP (an SRTP and a plain stream): required takes the SRTP one, off the plain one
    both = parse_sdp(SRTP_OFFER + b"m=audio 4002 RTP/AVP 0\r\n")
    assert negotiate(both, srtp="required")[1] == 0 and negotiate(both, srtp="off")[1] == 1


@pytest.mark.parametrize("value,result", [
    ("1 AES_CM_128_HMAC_SHA1_80 inline:" + "A" * 40, Crypto(1, "AES_CM_128_HMAC_SHA1_80", bytes(30))),
    ("1 AES_CM_128_HMAC_SHA1_80 inline:" + "A" * 40 + "|2^31", Crypto(1, "AES_CM_128_HMAC_SHA1_80", bytes(30))),
    ("1 AES_CM_128_HMAC_SHA1_80 inline:" + "A" * 40 + " KDR=1", None),  # a session parameter we do not implement
    ("1 AES_CM_128_HMAC_SHA1_80 inline:" + "A" * 40 + ";inline:" + "A" * 40, None),  # several keys
    ("1 AES_256_CM_HMAC_SHA1_80 inline:" + "A" * 60, None),  # a suite we do not offer
    ("1 AES_CM_128_HMAC_SHA1_80 inline:" + "A" * 40 + "|forever", SrtpError("crypto_malformed")),
    ("1 AES_CM_128_HMAC_SHA1_80 uri:http://x", SrtpError("crypto_malformed")),
    ("1 AES_CM_128_HMAC_SHA1_80 inline:" + "A" * 38 + "!!", SrtpError("crypto_bad_key")),
    ("1 AEAD_AES_128_GCM inline:" + "A" * 40, SrtpError("crypto_bad_key")),  # 30 bytes, GCM-128 keys are 28
    ("-1 AES_CM_128_HMAC_SHA1_80 inline:" + "A" * 40, SrtpError("crypto_malformed")),
])
def test_parse_crypto(value: str, result: Crypto | SrtpError | None) -> None:
    if isinstance(result, SrtpError):
        with pytest.raises(SrtpError) as exc:
            parse_crypto(value)
        assert exc.value.kind == result.kind
    else:
        assert parse_crypto(value) == result


@pytest.mark.parametrize("suite", ["AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32", "AEAD_AES_128_GCM",
                                   "AEAD_AES_256_GCM"])
def test_srtp_round_trip_and_forgeries(suite: str) -> None:
    a_key, b_key = new_key(suite), new_key(suite)
    alice, bob = SrtpContext(suite, a_key, b_key), SrtpContext(suite, b_key, a_key)
    rtp = build_rtp(0, 1000, 160, 0x1234, bytes(range(160)))
    sealed = alice.protect(rtp)
    assert sealed != rtp and sealed[:12] == rtp[:12]  # the header stays readable, the payload does not
    assert bob.unprotect(sealed) == rtp
    with pytest.raises(SrtpError) as exc:
        bob.unprotect(sealed)  # a replay
    assert exc.value.kind == "srtp_auth_failed"
    forged = bytearray(alice.protect(build_rtp(0, 1001, 320, 0x1234, bytes(160))))
    forged[20] ^= 1
    with pytest.raises(SrtpError):
        bob.unprotect(bytes(forged))
    sr = build_sender_report(0x1234, 320, 2, 320)
    assert bob.unprotect_rtcp(alice.protect_rtcp(sr)) == sr
    with pytest.raises(SrtpError) as exc:
        bob.unprotect_rtcp(sr)  # plain RTCP in an SRTP call
    assert exc.value.kind == "srtcp_auth_failed"


def test_rtp_roundtrip_and_rejects() -> None:
    pkt = parse_rtp(build_rtp(0, 65535, 160, 0xDEADBEEF, b"\xff" * 160, marker=True))
    assert (pkt.pt, pkt.seq, pkt.ts, pkt.ssrc, pkt.marker, len(pkt.payload)) == (0, 65535, 160, 0xDEADBEEF, True, 160)
    padded = bytearray(build_rtp(8, 1, 2, 3, b"ab" + b"\x00\x00\x03"))
    padded[0] |= 0x20
    assert parse_rtp(bytes(padded)).payload == b"ab"
    for bad, kind in [(b"\x80\x00", "short_packet"), (b"\x40" + b"\x00" * 20, "bad_version"),
                      (b"\x80\xc8" + b"\x00" * 20, "rtcp_on_rtp_port"), (b"\x8f" + b"\x00" * 20, "short_packet")]:
        with pytest.raises(RtpError) as exc:
            parse_rtp(bad)
        assert exc.value.kind == kind
    assert seq_delta(2, 65534) == 4 and seq_delta(65534, 2) == -4
    assert parse_rtcp(build_sender_report(1, 2, 3, 4)) == [200]
    with pytest.raises(RtpError):
        parse_rtcp(b"\x80\xc8\x00\x09")


def test_jitter_buffer_reorders_conceals_and_resyncs() -> None:
    jb = JitterBuffer(target=2)
    for seq in (100, 102, 101, 104):  # 103 lost, 101/102 swapped
        assert jb.push(seq, seq) == "ok"
    out = [jb.pop() for _ in range(6)]
    assert out[:5] == [(Slot.AUDIO, 100), (Slot.AUDIO, 101), (Slot.AUDIO, 102), (Slot.LOST, None), (Slot.AUDIO, 104)]
    assert out[5][0] is Slot.EMPTY
    assert jb.push(100, 1) == "late" and jb.stats["lost"] == 1
    assert jb.push(40000, 1) == "ok" and jb.stats["resync"] == 1  # wild jump: new stream, not "late"
    jb2 = JitterBuffer(target=2, max_depth=4)
    for s in range(10):
        jb2.push(s, s)
    assert len(jb2) <= 4 and jb2.pop() == (Slot.AUDIO, 6) and jb2.stats["overflow"] == 2  # bounded latency
    jb3 = JitterBuffer(target=1)
    jb3.push(65535, "a"), jb3.push(0, "b"), jb3.push(1, None)
    assert [jb3.pop() for _ in range(3)] == [(Slot.AUDIO, "a"), (Slot.AUDIO, "b"), (Slot.SKIP, None)]


def test_concealer_fades_to_silence() -> None:
    c = Concealer()
    c.good(np.full(160, 1000, dtype=np.int16))
    levels = [int(c.conceal()[0]) for _ in range(5)]
    assert levels == [800, 500, 250, 0, 0]


def test_dtmf_events_and_info() -> None:
    det = EventDetector()
    digits = [det.feed(ts, build_event(d, end, 800)) for ts, d, end in
              [(1000, "5", False), (1000, "5", False), (1000, "5", True), (1000, "5", True), (2000, "#", False)]]
    assert digits == ["5", None, None, None, "#"]
    assert parse_event(build_event("D", True, 320)) == ("D", True, 320)
    with pytest.raises(DtmfError):
        parse_event(b"\x20\x80\x00\x10")  # event 32: not a digit
    assert parse_info_body("application/dtmf-relay", b"Signal=*\r\nDuration=160\r\n") == "*"
    assert parse_info_body("application/dtmf", b"11") == "#"
    with pytest.raises(DtmfError):
        parse_info_body("text/plain", b"hello")


def test_digest_auth_roundtrip_md5_and_sha256() -> None:
    auth = DigestAuth("trunk", "pw", "voicebot")
    ch = auth.challenge()
    hdr = authorization_header(ch, "trunk", "pw", "INVITE", "sip:bot@h")
    assert auth.verify(hdr, "INVITE") == "ok"
    assert auth.verify(authorization_header(ch, "trunk", "bad", "INVITE", "sip:bot@h"), "INVITE") == "bad"
    assert auth.verify(hdr.replace("nonce=\"", "nonce=\"1"), "INVITE") == "bad"  # forged nonce
    assert auth.verify("", "INVITE") == "missing"
    sha = authorization_header(ch.replace("algorithm=MD5", "algorithm=SHA-256"), "trunk", "pw", "INVITE", "sip:b@h")
    assert auth.verify(sha, "INVITE") == "ok"
    p = parse_digest(hdr)
    ha1 = hashlib.md5(b"trunk:voicebot:pw").hexdigest()
    assert len(p["response"]) == 32 and ha1 != p["response"]


def test_digest_nonce_counts_refuse_replays() -> None:
    from telephony.sip.auth import digest_response

    auth = DigestAuth("trunk", "pw", "voicebot")
    nonce = parse_digest(auth.challenge())["nonce"]

    def hdr(nc: str, cnonce: str, qop: bool = True) -> str:
        resp = digest_response("MD5", "trunk", "voicebot", "pw", "INVITE", "sip:bot@h", nonce,
                               "auth" if qop else "", nc if qop else "", cnonce if qop else "")
        extra = f', qop=auth, nc={nc}, cnonce="{cnonce}"' if qop else ""
        return f'Digest username="trunk", realm="voicebot", nonce="{nonce}", uri="sip:bot@h", response="{resp}"{extra}'

    assert auth.verify(hdr("00000001", "a"), "INVITE") == "ok"
    assert auth.verify(hdr("00000001", "a"), "INVITE") == "replay"  # the same answer again
    assert auth.verify(hdr("00000002", "a"), "INVITE") == "ok"  # the client's next request on that nonce
    assert auth.verify(hdr("00000001", "a"), "INVITE") == "replay"  # an older count
    assert auth.verify(hdr("00000001", "b"), "INVITE") == "ok"  # another client nonce: its own counts
    assert auth.verify(hdr("zz", "c"), "INVITE") == "bad"  # a nonce count is 8 hex digits
    assert auth.verify(hdr("", "", qop=False), "INVITE") == "ok"  # no qop: good once
    assert auth.verify(hdr("", "", qop=False), "INVITE") == "replay"


def test_admission_helpers() -> None:
    allow = Allowlist("127.0.0.0/8, 10.1.0.0/16,::1/128")
    assert allow.allows("127.0.0.1") and allow.allows("10.1.2.3") and allow.allows("::1")
    assert allow.allows("::ffff:10.1.0.7") and not allow.allows("10.2.0.1") and not allow.allows("garbage")
    tb = TokenBucket(rate=1.0, burst=2)
    assert [tb.allow("a", 0.0), tb.allow("a", 0.0), tb.allow("a", 0.0), tb.allow("a", 1.5)] == [True, True, False, True]
    assert is_scanner("friendly-scanner", "") and is_scanner("", '"sipvicious" <sip:100@1.1.1.1>')
    assert not is_scanner("baresip v1.0.0", "<sip:alice@x>")
    queues = parse_queue_uris("billing=sip:billing@127.0.0.1:5090, retention=sip:ret@pbx,broken")
    assert queues == {"billing": "sip:billing@127.0.0.1:5090", "retention": "sip:ret@pbx"}
    assert resolve_target("billing", queues, "sip:op@x") == "sip:billing@127.0.0.1:5090"
    assert resolve_target("sip:direct@y", queues, "sip:op@x") == "sip:direct@y"
    assert resolve_target("unknown", queues, "sip:op@x") == "sip:op@x"
