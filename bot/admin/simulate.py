"""The console's try-it panel: one caller turn through the real engine and decide() under a policy.

There is no text->understanding model (the engine only hears audio), so typed text is first
spoken by the bot's own voice (engine.speak) and that audio is understood: the UI says so.
"""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from engine.types import SAMPLE_RATE, Understanding

MAX_SECONDS = 30.0


class NotWav(ValueError):
    pass


class EngineProblem(RuntimeError):
    """The engine could not process this input (422) or is not available (503)."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def _engine_error(exc: Exception) -> EngineProblem:
    if isinstance(exc, ValueError):  # engine.runtime.EngineInputError: too short, silence, bad audio
        return EngineProblem(422, "bad_audio", f"the engine could not use this audio: {exc}")
    return EngineProblem(503, "engine_unavailable", f"the speech engine failed: {exc}")


def wav_to_pcm8k(data: bytes) -> np.ndarray:
    """WAV bytes (any rate, PCM or float, mono or multi-channel) -> 8 kHz mono int16. CPU work: run in an executor."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX", b"RF64") or data[8:12] != b"WAVE":
        raise NotWav("not a WAV file (expected a RIFF/WAVE header); upload a .wav recording")
    try:
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise NotWav(f"unreadable WAV: {exc}") from exc
    if audio.shape[0] < rate // 10:
        raise NotWav("the WAV file holds less than 0.1 s of audio")
    if audio.shape[0] / rate > MAX_SECONDS:
        raise NotWav(f"the recording is longer than {MAX_SECONDS:.0f} s; one caller turn is expected")
    mono = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE)
    return (np.clip(mono, -1.0, 1.0) * 32767.0).astype(np.int16)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def decide_turn(policy: Any, understanding: Understanding) -> dict[str, Any]:
    """decide() on a fresh call (first caller turn), as the conversation would."""
    from policies.decide import CallState, decide

    state = CallState()
    decision = decide(policy, state, understanding)
    d = decision.to_dict() if hasattr(decision, "to_dict") else dict(decision)
    return _jsonable(d)


async def run(engine: Any, policy: Any, pcm: np.ndarray | None = None, text: str | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        if pcm is None:
            assert text is not None
            pcm = await engine.speak(text.strip())
            timings["speak_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        t1 = time.perf_counter()
        u: Understanding = await engine.understand(np.asarray(pcm, dtype=np.int16))
    except Exception as exc:  # noqa: BLE001 - mapped to a clear HTTP error, never a 500
        raise _engine_error(exc) from exc
    timings["understand_ms"] = round((time.perf_counter() - t1) * 1000, 1)
    decision = await asyncio.get_running_loop().run_in_executor(None, decide_turn, policy, u)
    return {
        "spoken_by_bot_voice": text is not None,
        "audio_seconds": round(len(pcm) / SAMPLE_RATE, 2),
        "understanding": _jsonable(u.to_dict()),
        "decision": decision,
        "timings": timings,
    }
