"""One call's RTP/RTCP session: UDP sockets, jitter buffer, DTMF, paced G.711 sending.

Inbound packets are parsed and buffered as they arrive; everything time-driven (playout of the
jitter buffer into 20 ms AudioIn frames, sending the next bot frame or silence, marks, RTP timeout,
RTCP reports) happens in `tick()`, called by the shared MediaClock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import socket
import time
from collections import deque
from typing import Callable

import numpy as np

from ops.logs import get_logger
from ops.metrics import AUDIO_FRAMES, ERRORS, LATE_FRAMES, RTP_PACKETS
from telephony.bridge import FRAME_SAMPLES, AudioIn, DtmfIn, InboundEvent, MarkIn
from telephony.g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from telephony.sip.dtmf import DtmfError, EventDetector
from telephony.sip.jitter import Concealer, JitterBuffer, Slot
from telephony.sip.quality import ReportBlock, Reception, ntp_now, parse_reports, round_trip_s
from telephony.sip.rtp import RtpError, build_rtp, build_sender_report, parse_rtcp, parse_rtp, seq_delta
from telephony.sip.sdp import Negotiated
from telephony.sip.srtp import Handover, SrtpContext, SrtpError, key_id, new_key

RTCP_INTERVAL_S = 5.0
PROBATION = 5  # in-sequence packets from a new address before symmetric RTP follows it
COMFORT_NOISE_PT = 13
_DECODERS = {0: ulaw_decode, 8: alaw_decode}
_STATIC_PT = {"PCMU": 0, "PCMA": 8}  # a G.711 codec the offer mapped to a dynamic payload type decodes as this
_ENCODERS = {"PCMU": ulaw_encode, "PCMA": alaw_encode}
_SILENCE = np.zeros(FRAME_SAMPLES, dtype=np.int16)


class _Mark:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, handler: Callable[[bytes, tuple], None]) -> None:
        self.handler = handler

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.handler(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable etc.: the peer may be gone
        RTP_PACKETS.labels("out", "icmp_error").inc()


class RtpSession:
    def __init__(self, call_id: str, emit: Callable[[InboundEvent], None], on_timeout: Callable[[], None],
                 jitter_target: int = 3, rtp_timeout_s: float = 30.0, transport_label: str = "sip",
                 rx_tap: Callable[[bytes, float], None] | None = None) -> None:
        self.call_id = call_id
        self.emit = emit
        self.on_timeout = on_timeout
        self.rtp_timeout_s = rtp_timeout_s
        self.label = transport_label
        self.rx_tap = rx_tap  # raw packets + arrival time, before the jitter buffer (simulator timing)
        self.log = get_logger("telephony.sip.rtp", call_id=call_id)
        self.local_port = 0
        self.neg: Negotiated | None = None
        self.remote: tuple[str, int] | None = None
        self._sdp_remote: tuple[str, int] | None = None  # the last real (not hold) address the SDP gave
        self.latched = False
        self.jitter = JitterBuffer(target=jitter_target)
        self.concealer = Concealer()
        self.dtmf = EventDetector()
        self._rtp: asyncio.DatagramTransport | None = None
        self._rtcp: asyncio.DatagramTransport | None = None
        self._out: deque[np.ndarray | _Mark] = deque()
        self._partial = np.zeros(0, dtype=np.int16)
        self._in_fifo = np.zeros(0, dtype=np.int16)
        self.ssrc = random.getrandbits(32)
        self._seq = random.getrandbits(16)
        self._ts = random.getrandbits(32)
        self._first = True
        self._remote_ssrc: int | None = None
        self.last_rx = time.monotonic()
        self._last_rtcp = time.monotonic()
        self.started = False
        self.stats = {"rx": 0, "tx": 0, "tx_octets": 0, "rx_bad": 0, "late_frames": 0, "rtcp_rx": 0,
                      "queued_frames": 0}
        self._timed_out = False
        self.timeout_armed = True  # the SIP call disarms it until its INVITE is ACKed (Timer H owns that)
        self._cand: tuple[tuple[str, int], int, int] | None = None
        self.reception = Reception()  # loss and jitter of what we receive (RFC 3550), reported in our RTCP
        self.peer_report: ReportBlock | None = None  # the phone's RTCP about what we send: its loss and jitter
        self.peer_rtt_s: float | None = None
        self._tx_at_peer_report = 0
        self._keys: dict[str, bytes] = {}  # our SRTP master key per suite: the one our SDP gave, kept all call
        self.srtp: SrtpContext | None = None
        self._wraps_since_snapshot: int | None = None  # set by continue_stream()
        self._elapsed_since_snapshot = 0.0
        self._srtp_resume: Handover | None = None  # the lost process's SRTP streams, for the first negotiation
        # Metric children resolved once: labels() per packet is measurable at 100 calls.
        self._m_in = AUDIO_FRAMES.labels(transport_label, "in")
        self._m_out = AUDIO_FRAMES.labels(transport_label, "out")
        self._m_late = LATE_FRAMES.labels(transport_label)
        self._m_rx_ok = RTP_PACKETS.labels("in", "ok")
        self._m_tx = RTP_PACKETS.labels("out", "sent")

    # Setup ---------------------------------------------------------------------------------------
    async def open(self, host: str, port_min: int, port_max: int) -> int:
        loop = asyncio.get_running_loop()
        for _ in range(50):
            port = random.randrange(port_min, port_max - 1) & ~1
            try:
                rtp, _ = await loop.create_datagram_endpoint(lambda: _Proto(self._on_rtp), local_addr=(host, port))
            except OSError:
                continue
            try:
                rtcp, _ = await loop.create_datagram_endpoint(lambda: _Proto(self._on_rtcp), local_addr=(host, port + 1))
            except OSError:
                rtp.close()
                continue
            self._rtp, self._rtcp, self.local_port = rtp, rtcp, port  # type: ignore[assignment]
            sock = rtp.get_extra_info("socket")
            if sock is not None:  # bigger buffers ride out event-loop stalls at high call counts
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
            return port
        raise OSError("no free RTP port pair in range")

    def outbound_position(self) -> tuple[int, int, int]:
        """(SSRC, next sequence number, next timestamp) of what we send: another process can go on with them."""
        return self.ssrc, self._seq, self._ts

    def continue_stream(self, ssrc: int, seq: int, ts: int, elapsed_s: float) -> None:
        """Send as the same RTP stream another process was sending elapsed_s ago (it died; this one carries the
        call on): same SSRC, sequence and timestamp moved on by the frames that time held (and one second more, so
        nothing already sent is repeated), the marker bit set. To the phone this is a gap, as after packet
        loss. A new SSRC with a random timestamp is a new stream, and a phone may drop it: baresip 1.0 discarded
        every frame as "old" for the rest of the call when the new timestamp happened to be behind the old one
        (about one call in two), so the caller heard nothing more."""
        frames = max(0, int(elapsed_s * 50)) + 50
        self.ssrc = ssrc & 0xFFFFFFFF
        self._wraps_since_snapshot = ((seq & 0xFFFF) + frames) >> 16
        self._elapsed_since_snapshot = elapsed_s
        self._seq = (seq + frames) & 0xFFFF
        self._ts = (ts + frames * FRAME_SAMPLES) & 0xFFFFFFFF
        self._first = True

    def apply(self, neg: Negotiated) -> None:
        """New offer/answer outcome (initial, hold/resume, codec change)."""
        hold_addr = neg.remote_ip in ("0.0.0.0", "::")
        sdp_addr = (neg.remote_ip, neg.remote_port)
        # A re-INVITE that moves the media (new address or port: the PBX hands the stream to another media
        # server or to the phone itself) must be followed at once, not after the new source's probation.
        # Hold (c=0.0.0.0) and a resume to the address we had keep the latched (NAT-traversing) peer.
        moved = not hold_addr and self._sdp_remote is not None and sdp_addr != self._sdp_remote
        if not hold_addr:
            self._sdp_remote = sdp_addr
        if not self.latched or self.remote is None or moved:
            self.remote = None if hold_addr else (neg.remote_ip, neg.remote_port)
            self.latched = False
        self._apply_crypto(neg)
        self.neg = neg
        self.last_rx = time.monotonic()  # a fresh negotiation restarts the RTP timeout

    def local_key(self, suite: str) -> bytes:
        """Our SRTP master key for `suite`, the same for every offer and answer of this call from this process."""
        if suite not in self._keys:
            self._keys[suite] = new_key(suite)
        return self._keys[suite]

    def continue_srtp(self, handover: Handover) -> None:
        """After continue_stream(): go on with the SRTP streams of the process that died. We encrypt under its key
        from its rollover counter (phones need not re-key: baresip 1.0 ignores a new key in a re-INVITE and could not
        decrypt a word from the new process), and take the phone's stream from where it had come, if the phone's
        answer keeps its key. Applied when that answer is."""
        self._keys[handover.suite] = handover.key
        # the lost process went on sending RTCP after the snapshot, one report per RTCP_INTERVAL_S: skip past those
        rtcp = handover.sent_rtcp + int(self._elapsed_since_snapshot / RTCP_INTERVAL_S) + 2
        if self._wraps_since_snapshot is not None:  # else a new stream (new SSRC): the phone counts it from 0
            handover = dataclasses.replace(handover, sent_roc=handover.sent_roc + self._wraps_since_snapshot,
                                           sent_rtcp=rtcp)
        else:
            handover = dataclasses.replace(handover, sent_roc=0, sent_rtcp=rtcp)
        self._srtp_resume = handover

    def srtp_handover(self) -> Handover | None:
        return Handover.of(self.srtp) if self.srtp is not None else None

    def _apply_crypto(self, neg: Negotiated) -> None:
        """SRTP per the negotiation: a context is kept while its key stays (libsrtp's rollover counter and replay
        window live in it: a re-INVITE that changes nothing must not reset them); a new key gets a new one."""
        c = neg.crypto
        if c is None:
            if self.srtp is not None:
                self.log.info("srtp_off")
            self.srtp = None
            return
        tx = self.local_key(c.suite)
        if self.srtp is None:
            self.srtp = SrtpContext(c.suite, tx, c.key)
            h = self._srtp_resume
            if h is not None and h.suite == c.suite:
                if tx == h.key:
                    self.srtp.send_on_from(self.ssrc, h.sent_roc, self._seq)
                    self.srtp.send_rtcp_on_from(self.ssrc, h.sent_rtcp)
                if key_id(c.key) == h.peer_key_id and h.peer_ssrc is not None and h.peer_seq is not None:
                    self.srtp.receive_on_from(h.peer_ssrc, h.peer_roc, h.peer_seq)
        elif self.srtp.rekey(c.suite, tx, c.key):
            self.log.info("srtp_rekeyed", suite=c.suite)
        self._srtp_resume = None

    def send_packet(self, pkt: bytes) -> None:
        """One RTP packet to the remote, encrypted when the call is SRTP."""
        if self._rtp is None or self.remote is None:
            return
        if self.srtp is not None:
            pkt = self.srtp.protect(pkt)
        self._rtp.sendto(pkt, self.remote)

    def close(self) -> None:
        for t in (self._rtp, self._rtcp):
            if t is not None:
                t.close()
        self._rtp = self._rtcp = None

    # Outbound --------------------------------------------------------------------------------------
    def queue_audio(self, pcm: np.ndarray) -> None:
        pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        if self._partial.size:
            pcm = np.concatenate([self._partial, pcm])
        n = pcm.size // FRAME_SAMPLES
        for i in range(n):
            self._out.append(pcm[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES])
        self._partial = pcm[n * FRAME_SAMPLES:].copy()

    def queue_mark(self, name: str) -> None:
        if self._partial.size:  # the tail must be heard before the mark fires
            pad = np.zeros(FRAME_SAMPLES, dtype=np.int16)
            pad[: self._partial.size] = self._partial
            self._out.append(pad)
            self._partial = np.zeros(0, dtype=np.int16)
        self._out.append(_Mark(name))

    def clear(self) -> None:
        """Barge-in: drop queued audio; pending marks fire now (the audio they guard will never play)."""
        now = time.monotonic()
        for item in self._out:
            if isinstance(item, _Mark):
                self.emit(MarkIn(item.name, now))
        self._out.clear()
        self._partial = np.zeros(0, dtype=np.int16)

    @property
    def queued_s(self) -> float:
        return sum(1 for i in self._out if not isinstance(i, _Mark)) * 0.02

    def _can_send(self) -> bool:
        return self.neg is not None and self.remote is not None and self.neg.direction in ("sendrecv", "sendonly")

    def _send_frame(self, now: float, late: bool) -> None:
        out = self._out
        while out and isinstance(out[0], _Mark):
            self.emit(MarkIn(out.popleft().name, now))  # type: ignore[union-attr]
        frame = _SILENCE
        if out:
            frame = out.popleft()  # type: ignore[assignment]
            self._m_out.inc()
            if late:
                self.stats["late_frames"] += 1
                self._m_late.inc()
        assert self.neg is not None and self.remote is not None
        payload = _ENCODERS[self.neg.codec](frame)
        pkt = build_rtp(self.neg.pt, self._seq, self._ts, self.ssrc, payload, marker=self._first)
        self._first = False
        self._seq = (self._seq + 1) & 0xFFFF
        self._ts = (self._ts + FRAME_SAMPLES) & 0xFFFFFFFF
        if self._rtp is not None:
            self.send_packet(pkt)
            self._m_tx.inc()
            self.stats["tx"] += 1
            self.stats["tx_octets"] += len(payload)

    # Inbound ---------------------------------------------------------------------------------------
    def _on_rtp(self, data: bytes, addr: tuple) -> None:
        if self.srtp is not None:
            if len(data) > 1 and 200 <= data[1] <= 204:  # RFC 5761 demux: SRTCP on the RTP port (rtcp-mux)
                self._on_rtcp(data, addr)
                return
            try:
                data = self.srtp.unprotect(data)
            except SrtpError as exc:  # forged, replayed, or keyed otherwise than the SDP said
                self._bad(exc.kind)
                return
        if self.rx_tap is not None:
            self.rx_tap(data, time.monotonic())
        try:
            pkt = parse_rtp(data)
        except RtpError as exc:
            if exc.kind == "rtcp_on_rtp_port":  # rtcp-mux (RFC 5761) peers
                self._on_rtcp(data, addr)
            else:
                self._bad(exc.kind)
            return
        neg = self.neg
        if neg is None:
            self._bad("no_session")
            return
        if self.latched and (addr[0], addr[1]) != self.remote and not self._probation(addr, pkt.seq):
            self._bad("foreign_source")
            return
        if self._remote_ssrc is not None and pkt.ssrc != self._remote_ssrc:
            self.jitter.reset()  # new source (e.g. after a re-INVITE / transfer leg): new sequence space
        audio_pt = pkt.pt if pkt.pt in _DECODERS else _STATIC_PT.get(neg.codec) if pkt.pt == neg.pt else None
        if audio_pt is not None:
            result = self.jitter.push(pkt.seq, (audio_pt, pkt.payload))
        elif neg.dtmf_pt is not None and pkt.pt == neg.dtmf_pt:
            try:
                digit = self.dtmf.feed(pkt.ts, pkt.payload)
            except DtmfError as exc:
                self._bad(exc.kind)
                return
            if digit:
                self.emit(DtmfIn(digit, time.monotonic()))
            result = self.jitter.push(pkt.seq, None)
        elif pkt.pt == COMFORT_NOISE_PT:
            result = self.jitter.push(pkt.seq, None)
        else:
            self._bad("unknown_payload_type")
            return
        self._remote_ssrc = pkt.ssrc
        self.reception.packet(pkt.ssrc, pkt.seq, pkt.ts, time.monotonic(), audio=audio_pt is not None)
        # Symmetric RTP (RFC 4961): answer where valid media comes from, which traverses NAT.
        self.remote = (addr[0], addr[1])
        self.latched = True
        self._cand = None
        self.last_rx = time.monotonic()
        self.stats["rx"] += 1
        (self._m_rx_ok if result == "ok" else RTP_PACKETS.labels("in", result)).inc()

    def _probation(self, addr: tuple, seq: int) -> bool:
        """A new source must send PROBATION packets in sequence before we re-latch to it (like
        Asterisk's strictrtp): one forged packet can't hijack the bot's audio, a real NAT rebinding can."""
        key = (addr[0], addr[1])
        if self._cand is not None and self._cand[0] == key and seq_delta(seq, self._cand[1]) == 1:
            self._cand = (key, seq, self._cand[2] + 1)
        else:
            self._cand = (key, seq, 1)
        return self._cand[2] >= PROBATION

    def _bad(self, kind: str) -> None:
        self.stats["rx_bad"] += 1
        RTP_PACKETS.labels("in", "invalid").inc()
        ERRORS.labels("rtp", kind).inc()

    def _on_rtcp(self, data: bytes, addr: tuple) -> None:
        try:
            if self.srtp is not None:
                data = self.srtp.unprotect_rtcp(data)
            parse_rtcp(data)
            blocks, sr = parse_reports(data)
            self.stats["rtcp_rx"] += 1
        except RtpError as exc:  # SrtpError included
            ERRORS.labels("rtp", exc.kind).inc()
            return
        if sr is not None and sr[0] == self.reception.ssrc:
            self.reception.sender_report(sr[1], sr[2])
        for block in blocks:
            if block.ssrc == self.ssrc:  # the phone on what we send
                self.peer_report, self._tx_at_peer_report = block, self.stats["tx"]
                self.peer_rtt_s = round_trip_s(block, *ntp_now()) or self.peer_rtt_s

    def quality(self) -> dict[str, float | int] | None:
        """The call's audio as RTP measured it: from the caller (loss, jitter) and, when the phone sends RTCP
        report blocks, to the caller (its loss and jitter) and the round trip. None before any audio."""
        r = self.reception
        if r.expected == 0 and self.peer_report is None:
            return None
        out: dict[str, float | int] = {
            "rx_packets": r.received, "rx_lost": r.lost, "rx_loss_pct": round(100 * r.lost / max(1, r.expected), 2),
            "rx_jitter_ms": round(r.jitter_s * 1000, 1)}
        p = self.peer_report
        if p is not None:
            out["peer_loss_pct"] = round(100 * max(0, p.cumulative_lost) / max(1, self._tx_at_peer_report), 2)
            out["peer_jitter_ms"] = round(p.jitter_ts / 8, 1)
        if self.peer_rtt_s is not None:
            out["rtt_ms"] = round(self.peer_rtt_s * 1000, 1)
        return out

    def _next_in_frame(self) -> np.ndarray:
        """Exactly 160 samples of caller audio per tick, whatever the caller's ptime."""
        fifo = self._in_fifo
        while fifo.size < FRAME_SAMPLES:
            slot, payload = self.jitter.pop()
            if slot is Slot.AUDIO and payload is not None:
                pt, data = payload
                pcm = _DECODERS[pt](data)
                fifo = np.concatenate([fifo, self.concealer.good(pcm)])
            elif slot is Slot.LOST:
                fifo = np.concatenate([fifo, self.concealer.conceal()])
            else:  # EMPTY / SKIP: silence (the caller sends nothing or a DTMF event)
                fifo = np.concatenate([fifo, _SILENCE])
        frame, self._in_fifo = fifo[:FRAME_SAMPLES], fifo[FRAME_SAMPLES:]
        return frame

    # Clock -----------------------------------------------------------------------------------------
    def tick(self, now: float, late: bool) -> None:
        if self.neg is None:
            return
        if self._can_send():
            self._send_frame(now, late)
        frame = self._next_in_frame()  # drained on hold too: no backlog of stale audio on resume
        if self.neg.direction in ("recvonly", "inactive"):
            # The caller holds us: what still arrives is their PBX's music/announcements on hold, not speech
            # meant for the bot, which must not be taken as caller turns.
            frame = _SILENCE
        self.emit(AudioIn(frame, now))
        self._m_in.inc()
        receiving = self.neg.direction == "sendrecv"  # on hold the caller may rightly send nothing
        if receiving and self.timeout_armed and now - self.last_rx > self.rtp_timeout_s and not self._timed_out:
            self._timed_out = True
            self.on_timeout()
        if now - self._last_rtcp > RTCP_INTERVAL_S and self._rtcp is not None and self.remote is not None:
            self._last_rtcp = now
            sr = build_sender_report(self.ssrc, self._ts, self.stats["tx"], self.stats["tx_octets"],
                                     self.reception.block())
            if self.srtp is not None:
                sr = self.srtp.protect_rtcp(sr)
            self._rtcp.sendto(sr, (self.remote[0], self.remote[1] + 1))
