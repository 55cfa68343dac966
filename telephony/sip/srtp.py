"""SRTP (RFC 3711) keyed by SDP Security Descriptions (SDES, RFC 4568): `a=crypto` lines and the per-call contexts.

The cipher work is libsrtp's, through pylibsrtp (BSD, already installed with aiortc); this module parses and writes
the SDP attribute and keeps one outbound and one inbound context per call. SDES carries the keys in the SDP, so
they are only as secret as the signalling: use it with SIP over TLS (docs/sip.md).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Callable

import pylibsrtp

from telephony.sip.rtp import RtpError, StreamPosition

# Suite name -> (libsrtp profile, master key + salt length in bytes). In our order of preference: the 80-bit tag
# first (every SDES phone and SBC has it), GCM where offered (RFC 7714), the 32-bit tag last.
SUITES: dict[str, tuple[int, int]] = {
    "AES_CM_128_HMAC_SHA1_80": (pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 30),
    "AEAD_AES_256_GCM": (pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_256_GCM, 44),
    "AEAD_AES_128_GCM": (pylibsrtp.Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 28),
    "AES_CM_128_HMAC_SHA1_32": (pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_32, 30),
}
OFFER_SUITE = "AES_CM_128_HMAC_SHA1_80"
SECURE_PROTOS = ("RTP/SAVP", "RTP/SAVPF")
MODES = ("off", "optional", "required")


class SrtpError(RtpError):
    """A crypto line or an SRTP/SRTCP packet we cannot take (kind names which): an RTP error like the others."""


@dataclass(frozen=True)
class Crypto:
    """One usable `a=crypto` line: its tag, suite and master key (key || salt)."""

    tag: int
    suite: str
    key: bytes

    def attribute(self) -> str:
        return f"a=crypto:{self.tag} {self.suite} inline:{base64.b64encode(self.key).decode()}"


def parse_crypto(value: str) -> Crypto | None:
    """The value of an `a=crypto:` attribute, or None when we cannot use it: an unknown suite, a master key
    identifier (MKI), several keys, or session parameters (RFC 4568 6.3: a line whose parameters an answerer does
    not understand must not be chosen). SrtpError when the line is malformed."""
    parts = value.split()
    if len(parts) < 3 or not parts[0].isdigit() or len(parts[0]) > 9:
        raise SrtpError("crypto_malformed")
    tag, suite, key_params = int(parts[0]), parts[1], parts[2]
    if suite not in SUITES:
        return None
    if len(parts) > 3 or ";" in key_params:
        return None
    method, _, info = key_params.partition(":")
    if method != "inline":
        raise SrtpError("crypto_malformed")
    b64, *extra = info.split("|")
    if any(":" in e for e in extra):  # MKI:length
        return None
    for lifetime in extra:  # "2^31" or a plain number; we never send that many packets on one call
        if not (lifetime.isdigit() or (lifetime.startswith("2^") and lifetime[2:].isdigit())):
            raise SrtpError("crypto_malformed")
    try:
        key = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise SrtpError("crypto_bad_key") from None
    if len(key) != SUITES[suite][1]:
        raise SrtpError("crypto_bad_key")
    return Crypto(tag, suite, key)


def new_key(suite: str) -> bytes:
    return os.urandom(SUITES[suite][1])


def _dummy(index: int, ssrc: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, index & 0xFFFF, 0, ssrc & 0xFFFFFFFF)


def _walk(target: int, ssrc: int, protect: Callable[[bytes], bytes]) -> None:
    """Bring a fresh context's stream `ssrc` to `target` (rollover counter << 16 | sequence number) with packets that
    are protected and thrown away, in steps of 2^14 (libsrtp's estimate takes them as progress). pylibsrtp cannot set
    a rollover counter, and a fresh context takes the first packet at counter 0."""
    index = -1
    while index < target:
        index = min(index + 0x4000, target)
        protect(_dummy(index, ssrc))


class SrtpContext:
    """A call's two SRTP contexts: ours (the key we wrote in our SDP) and the phone's (the key it wrote in its own).
    libsrtp keeps the rollover counter and the replay window per context, so each context lives exactly as long as
    its key: a re-offer that changes only the phone's key must not restart the count of what we send."""

    def __init__(self, suite: str, tx_key: bytes, rx_key: bytes) -> None:
        self.suite, self.tx_key, self.rx_key = suite, tx_key, rx_key
        self._tx = self._session(suite, tx_key, pylibsrtp.Policy.SSRC_ANY_OUTBOUND)
        self._rx = self._session(suite, rx_key, pylibsrtp.Policy.SSRC_ANY_INBOUND)
        # what went each way under the current keys: another process carrying the call on goes on from there
        self.sent, self.received = StreamPosition(), StreamPosition()
        self.sent_rtcp = 0  # SRTCP packets protected under tx_key: the next one's index (explicit in each packet)

    @staticmethod
    def _session(suite: str, key: bytes, direction: int) -> pylibsrtp.Session:
        return pylibsrtp.Session(pylibsrtp.Policy(key=key, ssrc_type=direction, srtp_profile=SUITES[suite][0]))

    def rekey(self, suite: str, tx_key: bytes, rx_key: bytes) -> bool:
        """Take a new negotiation's keys; the context of a key that did not change is kept. True if any changed."""
        if suite != self.suite:  # another suite: both contexts are new
            self.suite, self.tx_key, self.rx_key = suite, b"", b""
        changed = False
        if tx_key != self.tx_key:
            self.tx_key, self._tx, changed = tx_key, self._session(suite, tx_key, pylibsrtp.Policy.SSRC_ANY_OUTBOUND), True
            self.sent, self.sent_rtcp = StreamPosition(), 0
        if rx_key != self.rx_key:
            self.rx_key, self._rx, changed = rx_key, self._session(suite, rx_key, pylibsrtp.Policy.SSRC_ANY_INBOUND), True
            self.received = StreamPosition()
        return changed

    def protect(self, rtp: bytes) -> bytes:
        out = self._tx.protect(rtp)
        self.sent.step(int.from_bytes(rtp[8:12], "big"), int.from_bytes(rtp[2:4], "big"))
        return out

    def send_on_from(self, ssrc: int, roc: int, next_seq: int) -> None:
        """Make this fresh outbound context go on where another process's context under the same key stopped: its
        next packet, `next_seq`, goes with rollover counter `roc`. Nothing is sent under an index already used (the
        sequence number has jumped past what the other process can have sent): the phone sees a gap, as after loss."""
        if roc > 0:  # else a fresh context is right as it is
            _walk((roc << 16) + (next_seq & 0xFFFF) - 1, ssrc, self.protect)

    def receive_on_from(self, ssrc: int, roc: int, seq: int) -> None:
        """Make this fresh inbound context take the phone's stream, under the same key as another process took it,
        from its position there (rollover counter, last sequence number): the phone's next packets are a little
        ahead of it, which libsrtp's estimate follows. The walk is protected with the phone's key, which we hold."""
        if roc <= 0:
            return
        scratch = self._session(self.suite, self.rx_key, pylibsrtp.Policy.SSRC_ANY_OUTBOUND)

        def through(pkt: bytes) -> bytes:
            return self.unprotect(scratch.protect(pkt))

        _walk((roc << 16) + (seq & 0xFFFF), ssrc, through)

    def protect_rtcp(self, rtcp: bytes) -> bytes:
        self.sent_rtcp += 1
        return self._tx.protect_rtcp(rtcp)

    def send_rtcp_on_from(self, ssrc: int, index: int) -> None:
        """SRTCP numbers its packets itself (a 31-bit index in each): a fresh context under the same key would
        start again at 0, under indexes the other process used (the same keystream twice) and that the phone's
        replay window refuses. Walked past them with empty Receiver Reports protected and thrown away."""
        empty_rr = struct.pack("!BBHI", 0x80, 201, 1, ssrc & 0xFFFFFFFF)
        for _ in range(max(0, min(index, 1 << 20) - self.sent_rtcp)):
            self.protect_rtcp(empty_rr)

    def unprotect(self, srtp: bytes) -> bytes:
        """The RTP packet inside; SrtpError("srtp_auth_failed") for a forged, replayed or wrongly keyed one."""
        try:
            out = self._rx.unprotect(srtp)
        except pylibsrtp.Error:
            raise SrtpError("srtp_auth_failed") from None
        self.received.step(int.from_bytes(srtp[8:12], "big"), int.from_bytes(srtp[2:4], "big"))
        return out

    def unprotect_rtcp(self, srtcp: bytes) -> bytes:
        try:
            return self._rx.unprotect_rtcp(srtcp)
        except pylibsrtp.Error:
            raise SrtpError("srtcp_auth_failed") from None


def key_id(key: bytes) -> str:
    """Names a key without giving it away: whether the phone kept its key across a takeover."""
    return hashlib.sha256(key).hexdigest()[:16]


@dataclass(frozen=True)
class Handover:
    """What a process carrying an SRTP call on needs to go on with the same streams (kept in the call's record):
    the suite, OUR key and how far we sent under it, and how far the phone's stream had come under ITS key, which
    is named (key_id) but not written down: the phone gives it again in its answer to the re-INVITE."""

    suite: str
    key: bytes
    sent_roc: int  # of our next packet
    peer_key_id: str
    peer_ssrc: int | None
    peer_roc: int
    peer_seq: int | None
    sent_rtcp: int = 0  # the SRTCP index of our next RTCP packet

    @classmethod
    def of(cls, ctx: SrtpContext) -> Handover:
        r = ctx.received
        # the counter of the NEXT packet we send (its sequence number is the one the RTP snapshot keeps)
        sent_roc = ctx.sent.roc + (1 if ctx.sent.seq == 0xFFFF else 0)
        return cls(ctx.suite, ctx.tx_key, sent_roc, key_id(ctx.rx_key), r.ssrc, r.roc, r.seq, ctx.sent_rtcp)

    def to_json(self) -> dict[str, object]:
        return {"suite": self.suite, "key": base64.b64encode(self.key).decode(), "sent_roc": self.sent_roc,
                "peer_key_id": self.peer_key_id, "peer_ssrc": self.peer_ssrc, "peer_roc": self.peer_roc,
                "peer_seq": self.peer_seq, "sent_rtcp": self.sent_rtcp}

    @classmethod
    def from_json(cls, raw: object) -> Handover:
        """ValueError when unreadable."""
        if not isinstance(raw, dict) or raw.get("suite") not in SUITES:
            raise ValueError("srtp handover: no known suite")
        suite = str(raw["suite"])
        try:
            key = base64.b64decode(str(raw.get("key")), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("srtp handover: bad key") from None
        ints = [raw.get(k, 0 if k == "sent_rtcp" else None) for k in ("sent_roc", "peer_roc", "sent_rtcp")]
        opt = [raw.get(k) for k in ("peer_ssrc", "peer_seq")]
        if (len(key) != SUITES[suite][1] or not all(isinstance(v, int) and v >= 0 for v in ints)
                or not all(v is None or (isinstance(v, int) and v >= 0) for v in opt)):
            raise ValueError("srtp handover: bad counters")
        return cls(suite, key, int(ints[0]), str(raw.get("peer_key_id", "")), opt[0], int(ints[1]), opt[1],
                   int(ints[2]))
