"""DTMF: RFC 4733 telephone-event payloads and SIP INFO bodies (application/dtmf-relay, application/dtmf)."""

from __future__ import annotations

import re
import struct
from collections import deque

EVENTS = "0123456789*#ABCD"


class DtmfError(ValueError):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def parse_event(payload: bytes) -> tuple[str, bool, int]:
    """(digit, end_bit, duration in timestamp units) of one telephone-event payload."""
    if len(payload) < 4:
        raise DtmfError("short_event")
    event, flags, duration = struct.unpack_from("!BBH", payload)
    if event >= len(EVENTS):
        raise DtmfError("unknown_event")  # flash-hook, tones: not digits
    return EVENTS[event], bool(flags & 0x80), duration


def build_event(digit: str, end: bool, duration: int, volume: int = 10) -> bytes:
    return struct.pack("!BBH", EVENTS.index(digit.upper()), (0x80 if end else 0) | (volume & 0x3F), duration & 0xFFFF)


RECENT_EVENTS = 16


class EventDetector:
    """One digit per event: an event is identified by its RTP timestamp, and its packets
    (including the three redundant end packets) repeat that timestamp. The last few event timestamps
    are remembered, not just the last one: a redundant end packet of one key that arrives after the
    next key has started (reordered or duplicated by the network) must not press the first key again."""

    def __init__(self) -> None:
        self._recent: deque[int] = deque(maxlen=RECENT_EVENTS)

    def feed(self, ts: int, payload: bytes) -> str | None:
        digit, _end, _dur = parse_event(payload)
        if ts in self._recent:
            return None
        self._recent.append(ts)
        return digit


_RELAY = re.compile(r"(?im)^\s*signal\s*=\s*([0-9A-Da-d*#])\s*$")


def parse_info_body(content_type: str, body: bytes) -> str:
    """The digit in a SIP INFO body; raises DtmfError when the body carries none."""
    ctype = content_type.split(";")[0].strip().lower()
    text = body.decode("utf-8", errors="replace")
    if ctype == "application/dtmf-relay":
        m = _RELAY.search(text)
        if m:
            return m.group(1).upper()
    elif ctype == "application/dtmf":
        t = text.strip()
        if len(t) == 1 and t.upper() in EVENTS:
            return t.upper()
        if t.isdigit() and int(t) < len(EVENTS):
            return EVENTS[int(t)]
    raise DtmfError("bad_info_body")
