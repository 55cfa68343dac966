"""A small SIP UAC (caller simulator) for `bot call --sip`, tests and the benchmark.

It dials over UDP, offers PCMU/PCMA + telephone-event, plays WAV turns in real time through the same
RtpSession/MediaClock the server uses (so N simulated callers share one clock), records what the bot
says, can send RFC 4733 / SIP INFO DTMF, put the bot on hold (re-INVITE a=sendonly), cancel before
answer, and follows a REFER from the bot like a phone would: 202, dial the target, NOTIFY the result.
"""

from __future__ import annotations

import asyncio
import random
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ops.logs import get_logger
from telephony.bridge import FRAME_SAMPLES, AudioIn, CallEnded, MarkIn
from telephony.g711 import alaw_decode, ulaw_decode
from telephony.sip.auth import authorization_header
from telephony.sip.clock import MediaClock
from telephony.sip.dtmf import build_event
from telephony.sip.media import RtpSession
from telephony.sip.message import (
    SipMessage, SipParseError, addr_uri, hostport, make_response, new_branch, new_call_id, new_tag,
    parse_message,
)
from telephony.sip.rtp import build_rtp
from telephony.sip.sdp import Negotiated, SdpError, SdpSession, SessionDesc, negotiate, negotiate_answer, parse_sdp
from telephony.sip.srtp import OFFER_SUITE, Crypto
from telephony.sip.server import T1, T2, local_ip_for

log = get_logger("telephony.sip.uac")
VOICE_RMS = 300.0  # int16 RMS above which a received frame counts as speech
# A server that sends nothing back, not even 100 Trying (which the bot sends at once), within this many
# seconds is given up on (408): RFC 3261's Timer B (32 s) only makes sense once someone answers.
INVITE_NO_RESPONSE_S = 8.0


class SipTransportError(OSError):
    """A fatal transport error (ICMP port unreachable on our connected UDP socket): RFC 3261 8.1.3.1 treats
    it as a 503 from the server."""
_clocks: dict[int, MediaClock] = {}


def shared_clock() -> MediaClock:
    """One media clock per event loop, shared by every simulated caller in it."""
    loop = asyncio.get_running_loop()
    clock = _clocks.get(id(loop))
    if clock is None:
        clock = _clocks[id(loop)] = MediaClock()
    return clock


def read_wav_8k(path: str | Path) -> np.ndarray:
    """8 kHz mono 16-bit WAV -> int16 samples (other rates are resampled linearly)."""
    with wave.open(str(path), "rb") as w:
        rate, ch, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        raw = w.readframes(w.getnframes())
    if width != 2:
        raise ValueError(f"{path}: need 16-bit PCM, got {8 * width}-bit")
    pcm = np.frombuffer(raw, dtype=np.int16).reshape(-1, ch).mean(axis=1)
    if rate != 8000:
        n = int(len(pcm) * 8000 / rate)
        pcm = np.interp(np.linspace(0, len(pcm) - 1, n), np.arange(len(pcm)), pcm)
    return pcm.astype(np.int16)


def trailing_silence_s(pcm: np.ndarray, threshold: float = VOICE_RMS) -> float:
    """Seconds of quiet (20 ms frames under `threshold` RMS) at the end of a turn, so latency can be
    measured from the end of the caller's *speech*, not the end of the file."""
    n = pcm.size // FRAME_SAMPLES
    if n == 0:
        return 0.0
    frames = pcm[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES).astype(np.float32)
    voiced = np.flatnonzero(np.sqrt(np.mean(frames**2, axis=1)) > threshold)
    tail = pcm.size - n * FRAME_SAMPLES
    return ((n - 1 - voiced[-1]) * FRAME_SAMPLES + tail) / 8000 if voiced.size else 0.0


def write_wav_8k(path: str | Path, pcm: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.asarray(pcm, dtype=np.int16).tobytes())


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, ua: "SipCaller") -> None:
        self.ua = ua

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.ua.on_data(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        self.ua.on_transport_error(exc)


@dataclass
class TurnTiming:
    start: float
    end: float = 0.0
    first_voice_after_start: float | None = None
    first_voice_after_end: float | None = None


@dataclass
class CallerStats:
    rx_times: list[float] = field(default_factory=list)
    rx_seq_gaps: int = 0
    rx_packets: int = 0
    last_seq: int | None = None
    voiced_rx: list[float] = field(default_factory=list)  # arrival time of each voiced packet


class SipCaller:
    """One simulated caller: SIP signaling on its own UDP port, media on the shared clock."""

    def __init__(self, host: str, port: int, user: str = "caller", to_user: str = "bot",
                 auth: tuple[str, str] | None = None, codecs: tuple[str, ...] = ("PCMU", "PCMA"),
                 follow_moves: bool = False, srtp: str | None = None) -> None:
        self.host, self.port = host, port
        # follow_moves: take requests from any address and send ours to the dialog's remote target, as a phone
        # does (a call re-INVITEd by another host moves there); otherwise one connected socket to host:port
        self.follow_moves = follow_moves
        self._dest = (host, port)
        self.local_ip = local_ip_for(host)
        self.user, self.to_user, self.auth, self.codecs = user, to_user, auth, codecs
        self.srtp = srtp  # an SRTP suite: our offers are RTP/SAVP keyed with it (SDES)
        self.call_id = new_call_id(self.local_ip)
        self.from_tag = new_tag()
        self.to_tag = ""
        self.cseq = random.randint(1, 1000)
        self.remote_target = f"sip:{to_user}@{hostport(host, port)}"
        self.remote_addr = (host, port)
        self.sdp = SdpSession(self.local_ip)
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.media = RtpSession(self.call_id, self.events.put_nowait, lambda: None, jitter_target=2,
                                rtp_timeout_s=1e9, transport_label="uac", rx_tap=self._on_rtp_tap)
        self.stats = CallerStats()
        # client transactions by (branch, method): a CANCEL shares its INVITE's branch (RFC 3261 9.1)
        self._tx: dict[tuple[str, str], asyncio.Future[SipMessage]] = {}
        self._provisional: dict[str, list[int]] = {}
        self.prack = True  # PRACK reliable provisional responses (RFC 3262); False: a caller that never does
        self.reliable_rseqs: list[int] = []  # RSeq of every reliable provisional response received (retransmits too)
        self.prack_status: int | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self.sip_port = 0
        self.ended = asyncio.Event()
        self.hangup_by = ""
        self.refer_to: str | None = None
        self.reinvites: list[float] = []  # when the bot re-INVITEd us with a new offer (monotonic)
        self.updates: list[float] = []  # when the bot sent us an UPDATE (a session refresh)
        self.refuse_reinvite = 0  # answer the bot's re-INVITEs with this status instead (tests: a phone that hung up)
        self.notify_status: int | None = None
        self.transfer_call: SipCaller | None = None  # the leg to the Refer-To target, once answered
        self.transfer_status: int | None = None
        self.refer_dial_timeout_s = 6.0
        self.answered = asyncio.Event()
        self.final_status = 0
        self.error = ""  # why the call failed, in words (nothing listening, no answer at all)
        self._ok_response: SipMessage | None = None
        self._invite: SipMessage | None = None
        self._ack_body = b""
        self.recording: list[np.ndarray] = []
        self.marks: dict[str, asyncio.Event] = {}
        self.mark_times: dict[str, float] = {}  # when the audio queued before each mark had been sent
        self.last_voice_rx = 0.0
        self._consumer: asyncio.Task[None] | None = None
        self.clock = shared_clock()

    # Transport ---------------------------------------------------------------------------------------
    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        # Connected to the server: the kernel then reports an ICMP port unreachable (nothing listening) to us
        # as a refused connection, so a wrong port fails at once instead of after 32 s of retransmissions.
        # All our signaling goes to, and comes from, that one address.
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _Proto(self), local_addr=(self.local_ip, 0),
            remote_addr=None if self.follow_moves else (self.host, self.port))
        self.sip_port = self._udp.get_extra_info("sockname")[1]
        await self.media.open(self.local_ip, 30000, 40000)
        self._consumer = loop.create_task(self._consume())

    def close(self) -> None:
        self.clock.discard(self.media)
        self.media.close()
        if self._udp:
            self._udp.close()
        if self._consumer:
            self._consumer.cancel()

    def _contact(self) -> str:
        return f"<sip:{self.user}@{hostport(self.local_ip, self.sip_port)}>"

    def _send(self, msg: SipMessage, addr: tuple[str, int] | None = None) -> None:
        if self._udp is None or self._udp.is_closing():
            return
        if self.follow_moves:
            self._udp.sendto(msg.encode(), addr or self._dest)  # an answer goes back where its request came from
        else:
            self._udp.sendto(msg.encode())  # connected: only the server's address is reachable

    def _retarget(self, contact: str) -> None:
        """The peer's Contact: where our next requests in the dialog go (RFC 3261 12.2.1.1)."""
        self.remote_target = addr_uri(contact)
        if self.follow_moves:
            host, port, _user = parse_target(self.remote_target)
            self._dest = (host, port)

    def on_transport_error(self, exc: Exception) -> None:
        if not isinstance(exc, ConnectionRefusedError):
            return
        self.error = (f"nothing is listening for SIP on udp {self.host}:{self.port} (ICMP port unreachable): "
                      "is the bot running (`bot serve`) and is BOT_SIP_PORT that port?")
        log.warning("sip_uac_unreachable", call_id=self.call_id, target=f"{self.host}:{self.port}")
        for fut in self._tx.values():
            if not fut.done():
                fut.set_exception(SipTransportError(self.error))

    def on_data(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            msg = parse_message(data)
        except SipParseError:
            return
        if msg.is_request:
            self._on_request(msg, addr)
            return
        fut = self._tx.get((msg.branch, msg.cseq[1]))
        if msg.status < 200:
            self._provisional.setdefault(msg.branch, []).append(msg.status)
            rseq = msg.get("RSeq").strip()
            if "100rel" in msg.get("Require").lower() and rseq.isdigit():
                self.reliable_rseqs.append(int(rseq))
                if self.prack and self.reliable_rseqs.count(int(rseq)) == 1:
                    asyncio.get_running_loop().create_task(self._prack(msg, int(rseq)))
        elif fut is not None and not fut.done():
            fut.set_result(msg)
        elif msg.cseq[1] == "INVITE" and msg.status < 300 and self._ok_response is not None:
            self._send_ack(msg)  # our ACK was lost: the server retransmits its 200

    async def send_prack(self, rseq: int, invite_cseq: int, to_tag: str) -> int:
        """PRACK (RFC 3262 7.1) for the reliable provisional response `rseq` to our INVITE; its final status."""
        self.to_tag = self.to_tag or to_tag  # the early dialog the provisional response made
        resp = await self._transact(self._request("PRACK", extra=[("RAck", f"{rseq} {invite_cseq} INVITE")]), 10)
        self.prack_status = resp.status if resp is not None else 408
        return self.prack_status

    async def _prack(self, provisional: SipMessage, rseq: int) -> None:
        await self.send_prack(rseq, provisional.cseq[0], provisional.to_tag)

    # Requests ----------------------------------------------------------------------------------------
    def _request(self, method: str, body: bytes = b"", extra: list[tuple[str, str]] | None = None,
                 cseq: int | None = None, branch: str | None = None) -> SipMessage:
        if cseq is None:
            self.cseq += 1
        req = SipMessage(method=method, uri=self.remote_target)
        req.add("Via", f"SIP/2.0/UDP {hostport(self.local_ip, self.sip_port)};branch={branch or new_branch()};rport")
        req.add("Max-Forwards", "70")
        req.add("From", f"<sip:{self.user}@{hostport(self.local_ip)}>;tag={self.from_tag}")
        to = f"<sip:{self.to_user}@{hostport(self.host, self.port)}>" + (f";tag={self.to_tag}" if self.to_tag else "")
        req.add("To", to)
        req.add("Call-ID", self.call_id)
        req.add("CSeq", f"{cseq if cseq is not None else self.cseq} {method}")
        req.add("Contact", self._contact())
        req.add("User-Agent", "voicebot-uac/0.1")
        for k, v in extra or []:
            req.add(k, v)
        req.body = body
        return req

    async def _transact(self, req: SipMessage, timeout: float = 32.0,
                        no_response_s: float | None = None) -> SipMessage | None:
        """Send with UDP retransmissions; the final response, or None on timeout / a fatal transport error.
        no_response_s: give up sooner when not even a provisional response has come back."""
        fut: asyncio.Future[SipMessage] = asyncio.get_running_loop().create_future()
        self._tx[(req.branch, req.method)] = fut
        start = time.monotonic()
        self._send(req)
        interval, deadline = T1, start + timeout
        try:
            while time.monotonic() < deadline:
                if (no_response_s is not None and time.monotonic() - start >= no_response_s
                        and not self._provisional.get(req.branch)):
                    return None
                wait = min(interval, deadline - time.monotonic())
                if no_response_s is not None:
                    wait = max(0.01, min(wait, start + no_response_s - time.monotonic()))
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), wait)
                except SipTransportError:
                    return None
                except asyncio.TimeoutError:
                    provisional = bool(self._provisional.get(req.branch))
                    if not (req.method == "INVITE" and provisional):
                        self._send(req)
                    interval = T2 if provisional else min(interval * 2, T2)
            return None
        finally:
            self._tx.pop((req.branch, req.method), None)

    async def invite(self, timeout: float = 32.0, cancel_after_s: float | None = None,
                     late_offer: bool = False, no_response_s: float = INVITE_NO_RESPONSE_S,
                     extra: list[tuple[str, str]] | None = None) -> int:
        """Dial; returns the final status (200 when answered). Handles one 401 challenge.
        late_offer: send no SDP; the 200 carries the bot's offer and our ACK the answer.
        Nothing listening (ICMP port unreachable) -> 503 at once; no response at all within
        `no_response_s` -> 408; `self.error` then says why in words. `extra`: more headers (Session-Expires, ...)."""
        body = b"" if late_offer else self.sdp.offer(self.media.local_port, self.codecs, crypto=self._crypto())
        sdp_hdr = ([] if late_offer else [("Content-Type", "application/sdp")]) + list(extra or [])
        req = self._request("INVITE", body, sdp_hdr)
        self._invite = req
        task = asyncio.get_running_loop().create_task(self._transact(req, timeout, no_response_s))
        if cancel_after_s is not None:
            await asyncio.sleep(cancel_after_s)
            cancel = self._request("CANCEL", cseq=req.cseq[0], branch=req.branch)
            cancel.remove("Contact")
            await self._transact(cancel, 10)
        resp = await task
        if resp is not None and resp.status in (401, 407) and self.auth:
            self._send_ack(resp, req)
            challenge = resp.get("WWW-Authenticate") or resp.get("Proxy-Authenticate")
            hdr = authorization_header(challenge, self.auth[0], self.auth[1], "INVITE", req.uri)
            req = self._request("INVITE", body, sdp_hdr + [("Authorization", hdr)])
            self._invite = req
            resp = await self._transact(req, timeout, no_response_s)
        if resp is None:
            if self.error:  # on_transport_error: nothing listens there
                self.final_status = 503
                return 503
            waited = no_response_s if not self._provisional.get(req.branch) else timeout
            self.error = (f"no answer from {self.host}:{self.port} within {min(waited, timeout):g} s"
                          + (" (not even 100 Trying): is the bot running there, and does no firewall drop UDP?"
                             if not self._provisional.get(req.branch) else ""))
            self.final_status = 408
            return 408
        self.final_status = resp.status
        if resp.status >= 300:
            self._send_ack(resp, req)
            return resp.status
        self.to_tag = resp.to_tag
        contact = resp.get("Contact")
        if contact:
            self._retarget(contact)
        self._ok_response = resp
        try:
            offer = parse_sdp(resp.body)
            neg, idx = negotiate(offer, self.codecs)
        except SdpError as exc:
            log.error("bad_answer", kind=exc.kind)
            self._send_ack(resp)
            await self.bye()
            return 488
        self.media.apply(neg)
        if late_offer:
            self._ack_body = self._answer(offer, neg, idx)
        self._send_ack(resp)
        self.clock.add(self.media)
        self.answered.set()
        return resp.status

    def _crypto(self) -> Crypto | None:
        return Crypto(1, self.srtp, self.media.local_key(self.srtp)) if self.srtp else None

    def _answer(self, offer: SessionDesc, neg: Negotiated, idx: int) -> bytes:
        key = self.media.local_key(neg.crypto.suite) if neg.crypto is not None else None
        return self.sdp.answer(offer, neg, idx, self.media.local_port, key)

    def _send_ack(self, resp: SipMessage, invite: SipMessage | None = None) -> None:
        if resp.status >= 300 and invite is not None:
            # ACK for a non-2xx response: same branch, part of the INVITE transaction (17.1.1.3).
            ack = self._request("ACK", cseq=invite.cseq[0], branch=invite.branch)
            ack.set("To", resp.get("To"))
        else:
            ack = self._request("ACK", cseq=resp.cseq[0])
            if self._ack_body:
                ack.body = self._ack_body
                ack.add("Content-Type", "application/sdp")
        self._send(ack)

    async def bye(self) -> int:
        if self.ended.is_set():
            return 0
        self.hangup_by = self.hangup_by or "caller"
        resp = await self._transact(self._request("BYE"), 10)
        self._end()
        return resp.status if resp else 408

    async def reinvite(self, direction: str = "sendrecv", codecs: tuple[str, ...] | None = None,
                       extra: list[tuple[str, str]] | None = None) -> int:
        """Hold (sendonly) / resume (sendrecv) / codec change (codecs=...); `extra`: more headers."""
        offer = self.sdp.offer(self.media.local_port, codecs or self.codecs, direction=direction,
                               crypto=self._crypto())
        req = self._request("INVITE", offer, [("Content-Type", "application/sdp"), *(extra or [])])
        resp = await self._transact(req, 10)
        if resp is None:
            return 408
        if resp.status < 300:
            self.media.apply(negotiate_answer(parse_sdp(resp.body)))
            self._send_ack(resp)
        else:
            self._send_ack(resp, req)
        return resp.status

    async def update(self, extra: list[tuple[str, str]] | None = None) -> SipMessage | None:
        """An UPDATE without a body (a session refresh, RFC 3311/4028); its final response (None: timeout)."""
        return await self._transact(self._request("UPDATE", extra=extra), 10)

    async def info_dtmf(self, digit: str) -> int:
        req = self._request("INFO", f"Signal={digit}\r\nDuration=160\r\n".encode(),
                            [("Content-Type", "application/dtmf-relay")])
        resp = await self._transact(req, 10)
        return resp.status if resp else 408

    async def rfc4733_dtmf(self, digits: str, duration_ms: int = 100) -> None:
        """Send telephone-events in the RTP stream's sequence/ssrc space (3 redundant end packets)."""
        m = self.media
        if m.neg is None or m.neg.dtmf_pt is None or m.remote is None or m._rtp is None:
            raise RuntimeError("telephone-event was not negotiated")
        for d in digits:
            ts = m._ts
            steps = max(1, duration_ms // 20)
            for i in range(steps + 3):
                end = i >= steps
                dur = min(i + 1, steps) * FRAME_SAMPLES
                pkt = build_rtp(m.neg.dtmf_pt, m._seq, ts, m.ssrc, build_event(d, end, dur), marker=i == 0)
                m._seq = (m._seq + 1) & 0xFFFF
                m.send_packet(pkt)
                await asyncio.sleep(0.02)
            m._ts = (m._ts + steps * FRAME_SAMPLES) & 0xFFFFFFFF
            await asyncio.sleep(0.06)

    def _on_request(self, msg: SipMessage, addr: tuple[str, int]) -> None:
        if msg.method == "BYE":
            self._send(make_response(msg, 200), addr)
            self.hangup_by = self.hangup_by or "bot"
            self._end()
        elif msg.method == "REFER":
            self.refer_to = addr_uri(msg.get("Refer-To"))
            self._send(make_response(msg, 202), addr)
            asyncio.get_running_loop().create_task(self._notify_refer())
        elif msg.method == "ACK":
            return
        elif msg.method == "INVITE" and self.refuse_reinvite:
            self._send(make_response(msg, self.refuse_reinvite), addr)
        elif msg.method == "INVITE" and msg.body:
            self._answer_reinvite(msg, addr)
        elif msg.method == "UPDATE":
            self.updates.append(time.monotonic())
            self._send(make_response(msg, 200, extra=[("Session-Expires", msg.get("Session-Expires"))]
                                     if msg.get("Session-Expires") else []), addr)
        else:
            self._send(make_response(msg, 200), addr)

    def _answer_reinvite(self, msg: SipMessage, addr: tuple[str, int]) -> None:
        """The bot's re-INVITE (a restarted worker carrying the call on from a new RTP port): answer it as a phone
        does, and send our audio where the new offer says."""
        try:
            offer = parse_sdp(msg.body)
            neg, idx = negotiate(offer, self.codecs)
        except SdpError:
            self._send(make_response(msg, 488), addr)
            return
        contact = msg.get("Contact")
        if contact:
            self._retarget(contact)
        self.media.apply(neg)
        self.reinvites.append(time.monotonic())
        answer = self._answer(offer, neg, idx)
        self._send(make_response(msg, 200, extra=[("Contact", self._contact()),
                                                   ("Content-Type", "application/sdp")], body=answer), addr)

    async def _notify_refer(self) -> None:
        """Transferee side of RFC 3515: dial the Refer-To target ourselves, report progress and the
        final status to the bot in NOTIFY sipfrag bodies; the new call is kept in `transfer_call`."""
        await self._notify("SIP/2.0 100 Trying", "active;expires=60")
        status = 400
        try:
            host, port, user = parse_target(self.refer_to or "")
            leg = SipCaller(host, port, user=self.user, to_user=user, codecs=self.codecs)
            await leg.open()
            status = await leg.invite(timeout=self.refer_dial_timeout_s)
            if status == 200:
                self.transfer_call = leg
            else:
                leg.close()
        except (OSError, ValueError):
            status = 503
        self.transfer_status = status
        reason = "OK" if status == 200 else "Failed"
        await self._notify(f"SIP/2.0 {status} {reason}", "terminated;reason=noresource")

    async def _notify(self, frag: str, state: str) -> None:
        req = self._request("NOTIFY", frag.encode() + b"\r\n", [
            ("Event", "refer"), ("Subscription-State", state), ("Content-Type", "message/sipfrag;version=2.0")])
        resp = await self._transact(req, 10)
        self.notify_status = resp.status if resp else 408

    def _end(self) -> None:
        if not self.ended.is_set():
            self.ended.set()
            self.clock.discard(self.media)

    # Media -------------------------------------------------------------------------------------------
    def _on_rtp_tap(self, data: bytes, now: float) -> None:
        """Packet-level timing for the benchmark (before our own jitter buffer adds delay)."""
        if len(data) < 12 or data[0] >> 6 != 2:
            return
        seq = int.from_bytes(data[2:4], "big")
        st = self.stats
        if st.last_seq is not None:
            gap = (seq - st.last_seq) & 0xFFFF
            if 1 < gap < 1000:
                st.rx_seq_gaps += gap - 1
        st.last_seq = seq
        st.rx_packets += 1
        st.rx_times.append(now)
        pt = data[1] & 0x7F
        if pt in (0, 8):
            pcm = (ulaw_decode if pt == 0 else alaw_decode)(data[12:])
            if pcm.size and float(np.sqrt(np.mean(pcm.astype(np.float32) ** 2))) > VOICE_RMS:
                st.voiced_rx.append(now)

    async def _consume(self) -> None:
        while True:
            ev = await self.events.get()
            if isinstance(ev, AudioIn):
                if self.answered.is_set() and not self.ended.is_set():
                    self.recording.append(ev.pcm)
                    if float(np.sqrt(np.mean(ev.pcm.astype(np.float32) ** 2))) > VOICE_RMS:
                        self.last_voice_rx = ev.t
            elif isinstance(ev, MarkIn):
                self.mark_times[ev.name] = ev.t
                self.marks.setdefault(ev.name, asyncio.Event()).set()
            elif isinstance(ev, CallEnded):
                return

    async def play(self, pcm: np.ndarray, name: str) -> tuple[float, float]:
        """Queue audio and wait until it has been sent; returns (start, end) monotonic times."""
        ev = self.marks.setdefault(name, asyncio.Event())
        start = time.monotonic()
        self.media.queue_audio(pcm)
        self.media.queue_mark(name)
        ended = asyncio.ensure_future(self.ended.wait())
        marked = asyncio.ensure_future(ev.wait())
        await asyncio.wait({ended, marked}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        marked.cancel()
        return start, time.monotonic()

    async def wait_bot_quiet(self, quiet_s: float, max_s: float, min_s: float = 0.0) -> None:
        """Listen until the bot has said something and then been quiet for `quiet_s` (or max_s)."""
        t0 = time.monotonic()
        while not self.ended.is_set() and time.monotonic() - t0 < max_s:
            now = time.monotonic()
            if now - t0 >= min_s and self.last_voice_rx > t0 and now - self.last_voice_rx >= quiet_s:
                return
            await asyncio.sleep(0.05)

    def recorded(self) -> np.ndarray:
        return np.concatenate(self.recording) if self.recording else np.zeros(0, dtype=np.int16)


async def run_sip_call(host: str, port: int, wavs: list[str | Path] | list[np.ndarray], record_path: str | Path | None,
                       *, greeting_wait_s: float = 8.0, quiet_s: float = 1.2, turn_wait_s: float = 15.0,
                       dtmf: str = "", hangup: bool = True, auth: tuple[str, str] | None = None,
                       codecs: tuple[str, ...] = ("PCMU", "PCMA"), to_user: str = "bot",
                       srtp: str | None = None) -> dict[str, Any]:
    """Place one SIP call: wait for the greeting, play each WAV turn in real time (waiting for the bot to
    answer between turns), optionally send DTMF, hang up, and save what the bot said to `record_path`.
    srtp: offer SRTP with this suite (SDES) instead of RTP."""
    caller = SipCaller(host, port, auth=auth, codecs=codecs, to_user=to_user, srtp=srtp)
    await caller.open()
    turns: list[TurnTiming] = []
    t_start = time.monotonic()
    try:
        status = await caller.invite()
        if status != 200:
            out: dict[str, Any] = {"call_id": caller.call_id, "status": status, "answered": False}
            if caller.error:
                out["error"] = caller.error
            return out
        t_answer = time.monotonic()
        await caller.wait_bot_quiet(quiet_s, greeting_wait_s)
        greeting_s = (caller.stats.voiced_rx[0] - t_answer) if caller.stats.voiced_rx else None
        for i, w in enumerate(wavs):
            if caller.ended.is_set():
                break
            pcm = w if isinstance(w, np.ndarray) else read_wav_8k(w)
            start, end = await caller.play(pcm, f"turn{i}")
            end -= trailing_silence_s(pcm)  # end of speech, not of the file
            tt = TurnTiming(start, end)
            await caller.wait_bot_quiet(quiet_s, turn_wait_s)
            tt.first_voice_after_start = next((t for t in caller.stats.voiced_rx if t >= start), None)
            tt.first_voice_after_end = next((t for t in caller.stats.voiced_rx if t >= end), None)
            turns.append(tt)
        if dtmf and not caller.ended.is_set():
            await caller.rfc4733_dtmf(dtmf)
            await caller.wait_bot_quiet(quiet_s, turn_wait_s)
        if hangup and not caller.ended.is_set():
            await caller.bye()
        else:
            await asyncio.wait_for(caller.ended.wait(), timeout=turn_wait_s)
        if caller.transfer_call is not None:  # we were transferred: say hello to the agent, then leave
            await asyncio.sleep(1.0)
            await caller.transfer_call.bye()
    finally:
        if caller.transfer_call is not None:
            caller.transfer_call.close()
        caller.close()
    rec = caller.recorded()
    if record_path is not None:
        write_wav_8k(record_path, rec)
    return {
        "call_id": caller.call_id, "status": 200, "answered": True, "hangup_by": caller.hangup_by,
        "duration_s": round(time.monotonic() - t_start, 3),
        "greeting_latency_s": None if greeting_s is None else round(greeting_s, 3),
        "turn_latency_s": [None if t.first_voice_after_end is None else round(t.first_voice_after_end - t.end, 3)
                           for t in turns],
        "rx_packets": caller.stats.rx_packets, "rx_lost": caller.stats.rx_seq_gaps, "tx_packets": caller.media.stats["tx"],
        "srtp": caller.media.srtp.suite if caller.media.srtp is not None else None,
        "rx_srtp_failed": caller.media.stats["rx_bad"] if caller.media.srtp is not None else None,
        "bot_speech_s": round(len(caller.stats.voiced_rx) * 0.02, 2), "refer_to": caller.refer_to,
        "transfer_status": caller.transfer_status,
        "recorded_s": round(rec.size / 8000, 2), "record_path": str(record_path) if record_path else None,
    }


def parse_target(target: str) -> tuple[str, int, str]:
    """'sip:bot@127.0.0.1:5060' | '127.0.0.1:5060' | '127.0.0.1' -> (host, port, user)."""
    t = target.strip()
    if t.lower().startswith(("sip:", "sips:")):
        t = t.split(":", 1)[1]
    user, _, hostport = t.rpartition("@")
    hostport = hostport.split(";", 1)[0]
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = hostport.partition(":")
    return host, int(port or 5060), user or "bot"


def cli_main(args: Any) -> int:
    """`bot call --sip URI WAV... [--record out.wav]`: prints the call summary as JSON."""
    import json
    import os
    import sys

    from ops.logs import configure_logging

    configure_logging()  # JSON logs on stderr: stdout carries only the summary
    host, port, user = parse_target(args.sip)
    for w in args.wavs:
        if not os.path.exists(w):
            print(f"error: no such file {w}", file=sys.stderr)
            return 2
    auth = None
    if os.environ.get("BOT_SIP_PASSWORD"):
        auth = (os.environ.get("BOT_SIP_USER", ""), os.environ["BOT_SIP_PASSWORD"])
    try:
        summary = asyncio.run(run_sip_call(host, port, list(args.wavs), getattr(args, "record", None),
                                           turn_wait_s=float(getattr(args, "reply_timeout", 12.0)), auth=auth,
                                           to_user=user, srtp=OFFER_SUITE if getattr(args, "srtp", False) else None))
    except (OSError, ValueError) as exc:
        print(f"error: SIP call failed: {exc!r}", file=sys.stderr)
        return 1
    if summary.get("error"):
        print(f"error: SIP call failed: {summary['error']}", file=sys.stderr)
    else:
        _add_decisions(summary, getattr(args, "redis_url", None))
    print(json.dumps(summary, indent=2))
    return 0 if summary.get("answered") else 1


def _add_decisions(summary: dict[str, Any], redis_url: str | None) -> None:
    """What the bot understood and decided per turn, from the call's record in the bot's Redis (as for a
    call over the Twilio protocol); nothing when that Redis cannot be found or read."""
    from bot.redis_embedded import cli_redis_url
    from bot.simulator import fetch_call, turn_decisions

    url = cli_redis_url(redis_url)
    if not url or not summary.get("call_id"):
        return

    async def fetch() -> dict[str, Any] | None:
        await asyncio.sleep(0.3)  # let the bot flush the call's last events
        return await fetch_call("", str(summary["call_id"]), url)

    try:
        record = asyncio.run(fetch())
    except Exception as exc:  # noqa: BLE001 - the call itself succeeded; its readout is optional
        log.warning("sip_call_record_unavailable", error=repr(exc))
        return
    if record:
        summary["turns"] = turn_decisions(record)
        summary["outcome"] = record["record"].get("outcome")
