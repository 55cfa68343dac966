"""Receive-side jitter buffer: reorders by RTP sequence number and conceals loss.

Played out by the process-wide 20 ms clock (see pacer.py): each tick pops one slot. The buffer
waits for `target` packets before starting (absorbs that much jitter), skips ahead when it grows
past `max_depth` (bounds latency after a burst), and resynchronizes on wild sequence jumps or a new
SSRC instead of discarding the rest of the call as "late".
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import numpy as np

from telephony.sip.rtp import seq_delta

RESYNC_DISTANCE = 300  # packets (6 s at 20 ms): beyond this a jump is a new stream, not reordering


class Slot(Enum):
    AUDIO = "audio"
    SKIP = "skip"  # a sequence number used by a DTMF event packet: no audio, no concealment
    LOST = "lost"  # a gap with later packets already here: conceal
    EMPTY = "empty"  # nothing buffered (caller silent / on hold / still prefetching)


class JitterBuffer:
    def __init__(self, target: int = 2, max_depth: int = 12) -> None:
        self.target = max(1, target)
        self.max_depth = max(self.target + 1, max_depth)
        self._buf: dict[int, Any] = {}
        self._next: int | None = None
        self._primed = False
        self.stats = {"late": 0, "duplicate": 0, "lost": 0, "resync": 0, "overflow": 0, "reordered": 0}
        self._highest: int | None = None

    def __len__(self) -> int:
        return len(self._buf)

    def reset(self) -> None:
        self._buf.clear()
        self._next = None
        self._highest = None
        self._primed = False

    def push(self, seq: int, payload: Any) -> str:
        """Store a packet (payload None: a sequence slot with no audio). Returns a result label."""
        if self._next is None:
            self._next = seq
            self._highest = seq
        d = seq_delta(seq, self._next)
        if abs(d) > RESYNC_DISTANCE:
            self.stats["resync"] += 1
            self.reset()
            self._next = self._highest = seq
            d = 0
        if d < 0:
            self.stats["late"] += 1
            return "late"
        if seq in self._buf:
            self.stats["duplicate"] += 1
            return "duplicate"
        assert self._highest is not None
        if seq_delta(seq, self._highest) < 0:
            self.stats["reordered"] += 1
        else:
            self._highest = seq
        self._buf[seq] = payload
        if len(self._buf) > self.max_depth:
            self._skip_ahead()
            self.stats["overflow"] += 1
        return "ok"

    def _skip_ahead(self) -> None:
        """Drop the oldest entries so playout resumes `target` packets behind the newest."""
        assert self._highest is not None
        new_next = (self._highest - self.target + 1) & 0xFFFF
        for s in list(self._buf):
            if seq_delta(s, new_next) < 0:
                del self._buf[s]
        self._next = new_next

    def pop(self) -> tuple[Slot, Any]:
        if self._next is None or not self._buf:
            self._primed = False
            return Slot.EMPTY, None
        if not self._primed:
            assert self._highest is not None
            if seq_delta(self._highest, self._next) + 1 < self.target:
                return Slot.EMPTY, None
            self._primed = True
        seq = self._next
        self._next = (seq + 1) & 0xFFFF
        if seq in self._buf:
            payload = self._buf.pop(seq)
            return (Slot.SKIP, None) if payload is None else (Slot.AUDIO, payload)
        self.stats["lost"] += 1
        return Slot.LOST, None


class Concealer:
    """Packet loss concealment: repeat the last good frame with fading gain, then silence."""

    FADE = (0.8, 0.5, 0.25)

    def __init__(self, frame_samples: int = 160) -> None:
        self._last = np.zeros(frame_samples, dtype=np.int16)
        self._misses = 0
        self.silence = np.zeros(frame_samples, dtype=np.int16)

    def good(self, pcm: np.ndarray) -> np.ndarray:
        self._last = pcm
        self._misses = 0
        return pcm

    def conceal(self) -> np.ndarray:
        if self._misses >= len(self.FADE):
            return self.silence
        gain = self.FADE[self._misses]
        self._misses += 1
        return (self._last.astype(np.float32) * gain).astype(np.int16)
