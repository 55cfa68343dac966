"""The contract the conversation codes against. engine.runtime.Engine implements it."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from engine.types import SpeechStyle, Understanding


class SpeechEngine(Protocol):
    async def understand(self, pcm: np.ndarray) -> Understanding:
        """pcm: 8 kHz mono int16. Never blocks the event loop; batched across calls."""

    async def end_of_turn(self, pcm: np.ndarray) -> float:
        """Probability that the caller finished their turn (vs paused mid-sentence)."""

    async def speak(self, text: str, style: SpeechStyle | None = None) -> np.ndarray:
        """8 kHz mono int16 speech for `text`; cached for known prompts."""

    async def prerender(self, texts: list[str], style: SpeechStyle | None = None, *, background: bool = False) -> int:
        """Render and cache these prompts ahead of time (policy load); background: at the lowest priority,
        yielding to callers' speech. Returns how many were rendered."""
