"""A browser-like microphone for aiortc peers in tests: a sine tone, 48 kHz stereo s16, real-time paced."""

from __future__ import annotations

import asyncio
import fractions
import time

import numpy as np
from aiortc import MediaStreamTrack
from av import AudioFrame


class Tone(MediaStreamTrack):
    """A browser-like microphone: 48 kHz stereo s16, 20 ms frames, real-time paced."""

    kind = "audio"

    def __init__(self, hz: float) -> None:
        super().__init__()
        self.hz = hz
        self.n = 0
        self.t0: float | None = None

    async def recv(self) -> AudioFrame:
        if self.t0 is None:
            self.t0 = time.monotonic()
        wait = self.t0 + self.n / 48000 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        t = (self.n + np.arange(960)) / 48000
        mono = (8000 * np.sin(2 * np.pi * self.hz * t)).astype(np.int16)
        frame = AudioFrame.from_ndarray(np.repeat(mono, 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = 48000
        frame.pts = self.n
        frame.time_base = fractions.Fraction(1, 48000)
        self.n += 960
        return frame
