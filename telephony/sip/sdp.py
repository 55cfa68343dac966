"""SDP offer/answer (RFC 4566 / RFC 3264) for one audio stream: PCMU, PCMA and telephone-event, over RTP or SRTP.

Only what a G.711 voice bot needs: pick the first codec in the offerer's order that we support,
answer the mirror direction (sendonly -> recvonly for hold), reject every other m= line with port 0,
and raise SdpError (-> 488 Not Acceptable Here) when nothing is acceptable. SRTP streams (RTP/SAVP) are keyed by
SDES `a=crypto` lines (telephony/sip/srtp.py); whether they are taken, or required, is the `srtp` mode.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field

from telephony.sip.srtp import SECURE_PROTOS, SUITES, Crypto, SrtpError, parse_crypto

STATIC_CODECS = {0: "PCMU", 8: "PCMA"}
SUPPORTED = ("PCMU", "PCMA")
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
_MIRROR = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}


class SdpError(ValueError):
    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


@dataclass
class MediaDesc:
    media: str
    port: int
    proto: str
    fmts: list[int]
    rtpmap: dict[int, str] = field(default_factory=dict)  # pt -> "PCMU/8000"
    fmtp: dict[int, str] = field(default_factory=dict)
    direction: str | None = None
    connection: str | None = None
    ptime: int | None = None
    crypto: list[str] = field(default_factory=list)  # raw `a=crypto:` values, parsed when the stream is chosen


@dataclass
class SessionDesc:
    origin: str = ""
    connection: str | None = None
    direction: str = "sendrecv"
    media: list[MediaDesc] = field(default_factory=list)


@dataclass(frozen=True)
class Negotiated:
    """The outcome of one offer/answer: where to send, how to encode, who may send."""

    remote_ip: str
    remote_port: int
    codec: str  # PCMU | PCMA
    pt: int
    dtmf_pt: int | None
    direction: str  # OUR direction: sendrecv | sendonly | recvonly | inactive
    ptime: int
    crypto: Crypto | None = None  # SRTP: the peer's chosen `a=crypto` line (its key keys what it sends us)
    proto: str = "RTP/AVP"  # the chosen m-line's transport, mirrored in our answer


def parse_sdp(body: bytes) -> SessionDesc:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SdpError("bad_encoding") from None
    sess = SessionDesc()
    cur: MediaDesc | None = None
    saw_v = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if len(line) < 2 or line[1] != "=":
            raise SdpError("bad_line", line[:40])
        key, val = line[0], line[2:]
        if key == "v":
            saw_v = True
        elif key == "o":
            sess.origin = val
        elif key == "c":
            parts = val.split()
            if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
                raise SdpError("bad_connection", val[:40])
            addr = parts[2].split("/")[0]
            if cur is None:
                sess.connection = addr
            else:
                cur.connection = addr
        elif key == "m":
            parts = val.split()
            if len(parts) < 4 or not parts[1].split("/")[0].isdigit():
                raise SdpError("bad_media", val[:40])
            try:
                fmts = [int(f) for f in parts[3:]] if parts[2].startswith("RTP/") else []
            except ValueError:
                raise SdpError("bad_media", val[:40]) from None
            port = int(parts[1].split("/")[0])
            if port > 65535 or any(not 0 <= f <= 127 for f in fmts):
                raise SdpError("bad_media", val[:40])
            cur = MediaDesc(parts[0], port, parts[2], fmts)
            sess.media.append(cur)
        elif key == "a":
            name, _, rest = val.partition(":")
            if name in DIRECTIONS:
                if cur is None:
                    sess.direction = name
                else:
                    cur.direction = name
            elif cur is not None and name in ("rtpmap", "fmtp"):
                pt_s, _, desc = rest.partition(" ")
                if pt_s.isdigit():
                    (cur.rtpmap if name == "rtpmap" else cur.fmtp)[int(pt_s)] = desc.strip()
            elif cur is not None and name == "ptime" and rest.strip().isdigit():
                cur.ptime = int(rest.strip())
            elif cur is not None and name == "crypto":
                cur.crypto.append(rest.strip())
    if not saw_v:
        raise SdpError("missing_version")
    return sess


def _codec_name(m: MediaDesc, pt: int) -> str:
    if pt in m.rtpmap:
        name, _, rate = m.rtpmap[pt].partition("/")
        return f"{name.upper()}/{rate.split('/')[0]}"
    if pt in STATIC_CODECS:
        return f"{STATIC_CODECS[pt]}/8000"
    return ""


def _choose_crypto(m: MediaDesc) -> Crypto:
    """The offered `a=crypto` line we key with: our preferred suite among the usable ones (RFC 4568 7.1.1: the
    answerer picks one). SdpError when none is usable."""
    usable: list[Crypto] = []
    malformed = False
    for value in m.crypto:
        try:
            c = parse_crypto(value)
        except SrtpError:
            malformed = True
            continue
        if c is not None:
            usable.append(c)
    if not usable:
        raise SdpError("srtp_crypto_malformed" if malformed else "srtp_no_usable_crypto")
    order = list(SUITES)
    return min(usable, key=lambda c: order.index(c.suite))


def negotiate(offer: SessionDesc, prefer: tuple[str, ...] = SUPPORTED,
              srtp: str = "optional") -> tuple[Negotiated, int]:
    """Choose codec/direction for the first usable audio stream; returns (result, its m-line index).
    srtp: "off" (RTP/SAVP streams are skipped), "optional" (either), "required" (plain RTP streams are skipped)."""
    why = "no_common_codec"
    for idx, m in enumerate(offer.media):
        if m.media != "audio" or m.port == 0:
            continue
        secure = m.proto in SECURE_PROTOS
        if not secure and m.proto not in ("RTP/AVP", "RTP/AVPF"):
            continue  # DTLS-SRTP (UDP/TLS/RTP/SAVP) and others: try other streams, else 488
        if secure and srtp == "off":
            why = "srtp_off"
            continue
        if not secure and srtp == "required":
            why = "srtp_required"
            continue
        codec_pt: tuple[str, int] | None = None
        dtmf_pt: int | None = None
        for pt in m.fmts:
            name = _codec_name(m, pt)
            codec = name.split("/")[0]
            if codec in prefer and name.endswith("/8000") and codec_pt is None:
                codec_pt = (codec, pt)
            elif name == "TELEPHONE-EVENT/8000" and dtmf_pt is None:
                dtmf_pt = pt
        if codec_pt is None:
            continue
        crypto: Crypto | None = None
        if secure:
            try:
                crypto = _choose_crypto(m)
            except SdpError as exc:
                why = exc.kind
                continue
        addr = m.connection or offer.connection
        if not addr:
            raise SdpError("missing_connection")
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            # An FQDN is legal SDP, but every RTP sendto() to it would resolve it synchronously on the event
            # loop that carries all calls (a slow or dead DNS server stalls every call): refuse it clearly.
            raise SdpError("connection_not_ip", addr[:40]) from None
        remote_dir = m.direction or offer.direction
        if addr in ("0.0.0.0", "::"):
            remote_dir = "sendonly" if remote_dir == "sendrecv" else remote_dir  # RFC 2543 hold
        ptime = m.ptime if m.ptime in (10, 20, 30, 40, 60) else 20
        return Negotiated(addr, m.port, codec_pt[0], codec_pt[1], dtmf_pt, _MIRROR[remote_dir], ptime,
                          crypto, m.proto), idx
    raise SdpError(why)


class SdpSession:
    """Our side's origin line: the session version must grow on every changed answer (RFC 3264 8)."""

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.sess_id = int(time.time() * 1000) & 0xFFFFFFFF
        self.version = self.sess_id

    def _head(self) -> list[str]:
        ipv = "IP6" if ":" in self.ip else "IP4"
        return ["v=0", f"o=voicebot {self.sess_id} {self.version} IN {ipv} {self.ip}", "s=voicebot",
                f"c=IN {ipv} {self.ip}", "t=0 0"]

    def answer(self, offer: SessionDesc, neg: Negotiated, chosen_idx: int, rtp_port: int,
               local_key: bytes | None = None) -> bytes:
        """local_key: our SRTP master key for the chosen suite (needed when the chosen stream is SRTP)."""
        if neg.crypto is not None and local_key is None:
            raise ValueError("an SRTP answer needs our key")
        self.version += 1
        lines = self._head()
        for idx, m in enumerate(offer.media):
            if idx != chosen_idx:
                lines.append(f"m={m.media} 0 {m.proto} {' '.join(map(str, m.fmts)) or '0'}")
                continue
            fmts = [neg.pt] + ([neg.dtmf_pt] if neg.dtmf_pt is not None else [])
            lines.append(f"m=audio {rtp_port} {neg.proto} {' '.join(map(str, fmts))}")
            lines.append(f"a=rtpmap:{neg.pt} {neg.codec}/8000")
            if neg.dtmf_pt is not None:
                lines += [f"a=rtpmap:{neg.dtmf_pt} telephone-event/8000", f"a=fmtp:{neg.dtmf_pt} 0-16"]
            lines += ["a=ptime:20", f"a={neg.direction}"]
            if neg.crypto is not None and local_key is not None:  # the offer's tag and suite, our key
                lines.append(Crypto(neg.crypto.tag, neg.crypto.suite, local_key).attribute())
        return ("\r\n".join(lines) + "\r\n").encode()

    def offer(self, rtp_port: int, codecs: tuple[str, ...] = SUPPORTED, dtmf_pt: int = 101,
              direction: str = "sendrecv", crypto: Crypto | None = None) -> bytes:
        """crypto: offer SRTP (RTP/SAVP) keyed by this line (suite and our key)."""
        self.version += 1
        pts = [{"PCMU": 0, "PCMA": 8}[c] for c in codecs]
        proto = "RTP/SAVP" if crypto is not None else "RTP/AVP"
        lines = self._head() + [f"m=audio {rtp_port} {proto} {' '.join(map(str, pts + [dtmf_pt]))}"]
        lines += [f"a=rtpmap:{pt} {STATIC_CODECS[pt]}/8000" for pt in pts]
        lines += [f"a=rtpmap:{dtmf_pt} telephone-event/8000", f"a=fmtp:{dtmf_pt} 0-16", "a=ptime:20",
                  f"a={direction}"]
        if crypto is not None:
            lines.append(crypto.attribute())
        return ("\r\n".join(lines) + "\r\n").encode()


def negotiate_answer(answer: SessionDesc) -> Negotiated:
    """UAC side: the answer's first accepted audio stream."""
    neg, _ = negotiate(answer)
    return neg
