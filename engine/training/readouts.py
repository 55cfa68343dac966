"""Long account-number read-outs (8-16 s, longer than the model's window) said by one split's voices.

The real-speaker long read-out set (`bot engine asterisk --long`) is a test set: it measures, it must
not choose anything. Choices about long turns (how to cut them into pieces) are made on this set
instead: the same structure as `asterisk.long_readout` (9-14 digits in groups of 1-4, 50-200 ms between
digits, 300-900 ms between groups), each digit rendered on its own by a validation voice at a slow
rate, then the telephone channel. Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from engine.textnorm import UNITS
from engine.training.cache import write_manifest
from engine.training.channel import telephone
from engine.training.synth import _speech_bounds, make_babble, voices_by_split
from engine.training.tts import Prosody, Voice, synthesize


def _digit(voice: Voice, d: int, rate: float, cache: dict[tuple[str, int, float], np.ndarray]) -> np.ndarray:
    key = (voice.id, d, rate)
    if key not in cache:
        x = synthesize(voice, UNITS[d], Prosody(rate=rate))
        a, b = _speech_bounds(x)
        cache[key] = x[max(0, a - 160) : b + 160]
    return cache[key]


def readout(voice: Voice, rng: np.random.Generator, cache: dict) -> tuple[np.ndarray, str]:
    digits = "".join(str(d) for d in rng.integers(0, 10, int(rng.integers(9, 15))))
    rate = float(rng.choice([0.7, 0.8, 0.9]))  # callers read numbers slowly; few rates keep the cache small
    parts: list[np.ndarray] = []
    i = 0
    while i < len(digits):
        g = int(rng.integers(1, 5))
        for d in digits[i : i + g]:
            parts += [_digit(voice, int(d), rate, cache), np.zeros(int(rng.uniform(0.05, 0.2) * 8000), np.float32)]
        parts.append(np.zeros(int(rng.uniform(0.3, 0.9) * 8000), np.float32))
        i += g
    return np.concatenate(parts[:-1]), digits


def make_readout_eval(out_dir: str | Path, slot: str, split: str = "val", n: int = 150, seed: int = 0) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    voices = voices_by_split()[split]
    babble = make_babble()
    cache: dict = {}
    rows = []
    for k in range(n):
        voice = voices[int(rng.integers(len(voices)))]
        x, digits = readout(voice, rng, cache)
        pcm = telephone(x, rng, babble=babble)
        name = f"readout_{k:04d}.wav"
        sf.write(str(out / name), pcm, 8000, subtype="PCM_16")
        rows.append({"audio": name, "intent": None, "slots": {slot: digits}, "voice": voice.id,
                     "text": " ".join(UNITS[int(d)] for d in digits), "seconds": round(len(pcm) / 8000, 2)})
    write_manifest(out, rows)
    secs = [r["seconds"] for r in rows]
    return {"n": n, "out": str(out), "split": split, "voices": len({r["voice"] for r in rows}),
            "seconds_min": min(secs), "seconds_max": max(secs), "longer_than_8s": sum(s > 8 for s in secs)}
