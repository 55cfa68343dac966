"""Data types the engine hands to the rest of the system."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SAMPLE_RATE = 8000  # every audio array crossing a package boundary is 8 kHz mono int16 PCM


@dataclass(frozen=True)
class Understanding:
    """What one caller turn meant, and how sure the engine is.

    intent: top intent name, or None when the turn only carries slot values (e.g. digits).
    confidence: temperature-calibrated probability of `intent` (of the null-intent class when None).
    alternatives: top-k (intent, probability) pairs, best first, including the top one.
    slots: typed values: amount -> float, day -> "monday".."sunday"|"today"|"tomorrow",
           account_number -> digit string.
    transcript: CTC transcript (for logs and the human agent; never decides the intent).
    caller_state: e.g. {"frustration": 0.12} in [0, 1].
    end_of_turn: probability the caller has finished (vs only paused).
    timings: milliseconds per stage, e.g. {"features": 1.2, "model": 9.8, "total": 11.5}.
    error: set when the input could not be understood (silence, too short, bad audio).
    slot_candidates: every value heard for a slot when the turn said several ("no, fifty, not fifteen" ->
           {"amount": [50, 15]}); `slots` holds a value only where the turn alone says which one is meant,
           so the policy picks from these with what it asked (the value it read back is the wrong one).
    """

    intent: str | None
    confidence: float
    alternatives: list[tuple[str | None, float]] = field(default_factory=list)
    slots: dict[str, Any] = field(default_factory=dict)
    transcript: str = ""
    caller_state: dict[str, float] = field(default_factory=dict)
    end_of_turn: float = 1.0
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    slot_candidates: dict[str, list[Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["alternatives"] = [[name, round(p, 4)] for name, p in self.alternatives]
        return d


@dataclass(frozen=True)
class SpeechStyle:
    """How the voice renders a sentence. `calm` is slower and lower for a frustrated caller."""

    name: str = "neutral"  # neutral | calm | brisk
    rate: float = 1.0  # >1 faster
    pitch: float = 1.0

    @classmethod
    def named(cls, name: str) -> "SpeechStyle":
        return {"calm": cls("calm", 0.88, 0.95), "brisk": cls("brisk", 1.1, 1.0)}.get(name, cls())
