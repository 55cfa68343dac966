"""Audio quality of a call's RTP, as RFC 3550 measures it: what we receive (loss, interarrival jitter; A.3, A.8),
the report blocks we put in our RTCP, and what the phone's RTCP says about what we send (its loss and jitter, and
the round trip from LSR/DLSR, 6.4.1). When a caller says the bot was choppy, the call's story says which way.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from telephony.sip.rtp import NTP_EPOCH_OFFSET, RtpError, StreamPosition, seq_delta

CLOCK_HZ = 8000  # G.711 and telephone-event
REPORT_BLOCK = struct.Struct("!IB3sIIII")  # SSRC, fraction lost, cumulative lost (24-bit), ext seq, jitter, LSR, DLSR


def ntp_now() -> tuple[int, int]:
    now = time.time() + NTP_EPOCH_OFFSET
    hi = int(now)
    return hi & 0xFFFFFFFF, int((now - hi) * (1 << 32)) & 0xFFFFFFFF


def _mid32(hi: int, lo: int) -> int:
    return ((hi & 0xFFFF) << 16) | (lo >> 16)


@dataclass(frozen=True)
class ReportBlock:
    ssrc: int
    fraction_lost: float  # since the sender's previous report
    cumulative_lost: int
    ext_highest_seq: int
    jitter_ts: int  # in RTP timestamp units
    lsr: int
    dlsr: int  # 1/65536 s


class Reception:
    """One source's inbound stream (RFC 3550 A.1, A.3, A.8): what to report about it, and a summary."""

    def __init__(self) -> None:
        self._start(None, 0)

    def _start(self, ssrc: int | None, seq: int) -> None:
        self._pos = StreamPosition()  # the extended highest sequence number (A.1)
        if ssrc is not None:
            self._pos.step(ssrc, seq)
        self._base = seq
        self.received = 0
        self._jitter = 0.0  # timestamp units, 1/16 gain
        self._transit: float | None = None
        self._expected_prior = self._received_prior = 0
        self._sr_mid32 = 0  # the middle of the NTP time in the source's last Sender Report
        self._sr_at = 0.0  # when it came (monotonic)

    @property
    def ssrc(self) -> int | None:
        return self._pos.ssrc

    def packet(self, ssrc: int, seq: int, ts: int, arrival: float, audio: bool) -> None:
        if ssrc != self.ssrc:  # a new source (a re-INVITE to another media server): its own counts
            self._start(ssrc, seq)
        elif seq_delta(seq, self._pos.seq or 0) < -3000:  # a restarted sequence (A.1's resync, simplified)
            self._start(ssrc, seq)
        else:
            self._pos.step(ssrc, seq)
        self.received += 1
        if audio:  # telephone-events reuse a timestamp for a whole key press: they say nothing about jitter
            transit = arrival * CLOCK_HZ - ts
            if self._transit is not None:
                d_transit = abs(transit - self._transit)
                if d_transit < CLOCK_HZ * 10:  # not a timestamp jump (a new talk spurt after hold)
                    self._jitter += (d_transit - self._jitter) / 16
            self._transit = transit

    def sender_report(self, ntp_hi: int, ntp_lo: int) -> None:
        self._sr_mid32, self._sr_at = _mid32(ntp_hi, ntp_lo), time.monotonic()

    @property
    def expected(self) -> int:
        return self._pos.index() - self._base + 1 if self.ssrc is not None else 0

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.received)

    @property
    def jitter_s(self) -> float:
        return self._jitter / CLOCK_HZ

    def block(self) -> bytes | None:
        """Our report block about this source (RFC 3550 6.4.1), or None before it sent anything."""
        if self.ssrc is None:
            return None
        expected, received = self.expected, self.received
        exp_int, rec_int = expected - self._expected_prior, received - self._received_prior
        self._expected_prior, self._received_prior = expected, received
        lost_int = exp_int - rec_int
        fraction = 0 if exp_int <= 0 or lost_int <= 0 else min(255, (lost_int << 8) // exp_int)
        cumulative = max(-(1 << 23), min((1 << 23) - 1, expected - received)) & 0xFFFFFF
        dlsr = int((time.monotonic() - self._sr_at) * 65536) if self._sr_mid32 else 0
        return REPORT_BLOCK.pack(self.ssrc, fraction, cumulative.to_bytes(3, "big"),
                                 self._pos.index() & 0xFFFFFFFF, int(self._jitter) & 0xFFFFFFFF,
                                 self._sr_mid32, dlsr & 0xFFFFFFFF)


def parse_reports(data: bytes) -> tuple[list[ReportBlock], tuple[int, int, int] | None]:
    """The report blocks in a compound RTCP packet, and the (SSRC, NTP hi, NTP lo) of its Sender Report if any.
    RtpError on a malformed block (the compound's framing itself is checked by rtp.parse_rtcp)."""
    blocks: list[ReportBlock] = []
    sr: tuple[int, int, int] | None = None
    off = 0
    while off + 8 <= len(data):
        b0, pt, length = struct.unpack_from("!BBH", data, off)
        end = off + 4 * (length + 1)
        count = b0 & 0x1F
        first = off + 8
        if pt == 200:  # SR: sender info (NTP, RTP ts, counts) before the blocks
            if end - off < 28:
                raise RtpError("rtcp_short")
            sr = struct.unpack_from("!III", data, off + 4)
            first = off + 28
        if pt in (200, 201):
            if first + count * REPORT_BLOCK.size > min(end, len(data)):
                raise RtpError("rtcp_short")
            for i in range(count):
                ssrc, frac, cum, ext, jit, lsr, dlsr = REPORT_BLOCK.unpack_from(data, first + i * REPORT_BLOCK.size)
                cumulative = int.from_bytes(cum, "big")
                if cumulative & 0x800000:
                    cumulative -= 1 << 24
                blocks.append(ReportBlock(ssrc, frac / 256, cumulative, ext, jit, lsr, dlsr))
        off = end
    return blocks, sr


def round_trip_s(block: ReportBlock, at_hi: int, at_lo: int) -> float | None:
    """RFC 3550 6.4.1: arrival - LSR - DLSR, when the block refers to one of our Sender Reports."""
    if not block.lsr:
        return None
    rtt = (_mid32(at_hi, at_lo) - block.lsr - block.dlsr) & 0xFFFFFFFF
    return rtt / 65536 if rtt < (60 << 16) else None  # more than a minute: clocks or counters confused
