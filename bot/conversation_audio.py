"""Caller audio kept for turns (a ring indexed by absolute sample position) and the bot's own
speech rendering (pre-rendered prompts straight from memory, everything else streamed)."""

from __future__ import annotations

from typing import Any, AsyncIterator

import numpy as np

from engine.types import SpeechStyle

RING_SAMPLES = 8000 * 30


class CallerAudio:
    """The last 30 s of caller audio; positions are absolute sample counts since the call began."""

    def __init__(self) -> None:
        self._ring = np.zeros(RING_SAMPLES, dtype=np.int16)
        self.pos = 0

    def append(self, pcm: np.ndarray) -> None:
        n = len(pcm)
        i = self.pos % RING_SAMPLES
        if i + n <= RING_SAMPLES:
            self._ring[i : i + n] = pcm
        else:
            k = RING_SAMPLES - i
            self._ring[i:] = pcm[:k]
            self._ring[: n - k] = pcm[k:]
        self.pos += n

    def segment(self, start: int, end: int) -> np.ndarray:
        end = min(end, self.pos)
        start = max(start, end - RING_SAMPLES + 1, 0)
        if end <= start:
            return np.zeros(0, dtype=np.int16)
        a, b = start % RING_SAMPLES, end % RING_SAMPLES
        if a < b:
            return self._ring[a:b].copy()
        return np.concatenate([self._ring[a:], self._ring[:b]])


def level_dbfs(pcm: np.ndarray) -> float:
    """Active-speech level of a bot utterance (frames above -50 dBFS), the echo reference."""
    if len(pcm) < 160:
        return -90.0
    n = len(pcm) // 160
    f = pcm[: n * 160].astype(np.float32).reshape(n, 160) / 32768.0
    e = (f * f).mean(axis=1)
    active = e[e > 1e-5]
    if len(active) == 0:
        return -90.0
    return float(10 * np.log10(active.mean()))


async def render(engine: Any, cache: dict[tuple[str, str], np.ndarray], text: str, style: str) -> AsyncIterator[np.ndarray]:
    """Yield 8 kHz int16 chunks for `text`: the pre-rendered copy when there is one, else the
    engine's streaming voice (first chunk as soon as it exists), else its whole-sentence voice."""
    hit = cache.get((text, style))
    if hit is not None:
        yield hit
        return
    st = SpeechStyle.named(style)
    stream = getattr(engine, "speak_stream", None)
    if stream is not None:
        async for chunk in stream(text, st):
            if len(chunk):
                yield np.asarray(chunk, dtype=np.int16)
        return
    yield np.asarray(await engine.speak(text, st), dtype=np.int16)
