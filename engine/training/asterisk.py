"""A REAL-speech evaluation set from Debian's asterisk-core-sounds-en-wav (one human voice, 8 kHz).

Caller-like answers are composed from the recorded prompts: account numbers digit by digit
(digits/N.wav, "oh"), amounts ("forty five dollars"), days ("tuesday", "tomorrow") -- intent null with
slots -- plus the few recordings that are caller intents: "goodbye", "thank you ... goodbye", "no",
"agent". Written in the evaluation-manifest format. `--long`: a separate set of account numbers read in
groups with pauses for 8-16 s, longer than the model's window (engine.long_turns).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from engine.catalog import Catalog
from engine.features import resample
from engine.textnorm import TENS, TEENS, UNITS
from engine.training.cache import write_manifest

SOUNDS = Path("/usr/share/asterisk/sounds/en")
DAY_FILES = {f"day-{i}": d for i, d in enumerate(["sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"])}
INTENT_CLIPS = [  # (files, text, intent)
    (["goodbye"], "goodbye", "goodbye"),
    (["vm-goodbye"], "goodbye", "goodbye"),
    (["auth-thankyou", "goodbye"], "thank you goodbye", "goodbye"),
    (["auth-thankyou", "vm-goodbye"], "thank you goodbye", "goodbye"),
    (["vm-no"], "no", "deny"),
    (["spy-agent"], "agent", "speak_to_agent"),
]


def _load(name: str) -> np.ndarray:
    x, sr = sf.read(str(SOUNDS / f"{name}.wav"), dtype="float32", always_2d=False)
    if x.ndim > 1:
        x = x.mean(1)
    x = resample(x, sr, 8000) if sr != 8000 else x
    # trim the recordings' leading/trailing silence so composed words follow each other naturally
    e = np.abs(x) > 0.02 * (np.abs(x).max() + 1e-9)
    idx = np.where(e)[0]
    return x[max(0, idx[0] - 200) : idx[-1] + 400] if len(idx) else x


def _number_files(n: int) -> tuple[list[str], str]:
    files, words = [], []
    if n >= 100:
        files += [f"digits/{n // 100}", "digits/hundred"]; words += [UNITS[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        files.append(f"digits/{n - n % 10}"); words.append(TENS[n // 10 - 2])
        if n % 10:
            files.append(f"digits/{n % 10}"); words.append(UNITS[n % 10])
    elif n >= 10:
        files.append(f"digits/{n}"); words.append(TEENS[n - 10])
    elif n > 0:
        files.append(f"digits/{n}"); words.append(UNITS[n])
    return files, " ".join(words)


def long_readout(rng: np.random.Generator, gap_s: tuple[float, float] = (0.3, 0.9)) -> tuple[np.ndarray, str]:
    """A 9-14 digit account number read in groups of 1-4 digits with gap_s pauses between groups
    (8-16 s: longer than the model's 8 s window). Returns (float audio, digit string)."""
    digits = "".join(str(d) for d in rng.integers(0, 10, int(rng.integers(9, 15))))
    parts = [np.zeros(int(rng.uniform(0.1, 0.4) * 8000), np.float32)]
    i = 0
    while i < len(digits):
        g = int(rng.integers(1, 5))
        for d in digits[i : i + g]:
            parts += [_load(f"digits/{d}"), np.zeros(int(rng.uniform(0.05, 0.2) * 8000), np.float32)]
        parts.append(np.zeros(int(rng.uniform(*gap_s) * 8000), np.float32))
        i += g
    return np.concatenate(parts), digits


def make_asterisk_eval(out_dir: str | Path, catalog: Catalog, n: int = 200, seed: int = 0, long: bool = False) -> dict:
    """long: every clip is a long account-number read-out (long_readout) instead of the usual mix."""
    if not (SOUNDS / "digits" / "1.wav").exists():
        raise FileNotFoundError(f"{SOUNDS} has no digits/ (install asterisk-core-sounds-en-wav)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    acct, money, day = catalog.slot_of_type("digits"), catalog.slot_of_type("money"), catalog.slot_of_type("day")
    rows = []
    for k in range(n):
        r = rng.random()
        if long:
            x, digits = long_readout(rng)
            files, text = [f"digits/{d}" for d in digits], " ".join(UNITS[int(d)] for d in digits)
            intent, slots = None, {acct: digits}
        elif r < 0.35:
            digits = "".join(str(d) for d in rng.integers(0, 10, int(rng.integers(4, 9))))
            oh = rng.random() < 0.3
            files = [("digits/oh" if (d == "0" and oh) else f"digits/{d}") for d in digits]
            text = " ".join(("oh" if (d == "0" and oh) else UNITS[int(d)]) for d in digits)
            intent, slots = None, {acct: digits}
        elif r < 0.55:
            v = int(rng.integers(1, 1000))
            files, text = _number_files(v)
            files, text = files + ["digits/dollars"], text + " dollars"
            intent, slots = None, {money: v}
        elif r < 0.7:
            key = str(rng.choice(list(DAY_FILES) + ["today", "tomorrow"]))
            files = [f"digits/{key}"]
            text = DAY_FILES.get(key, key)
            intent, slots = None, {day: text}
        else:
            files, text, intent = INTENT_CLIPS[int(rng.integers(len(INTENT_CLIPS)))]
            slots = {}
        if not long:
            parts = []
            for f in files:
                parts += [_load(f), np.zeros(int(rng.uniform(0.03, 0.15) * 8000), np.float32)]
            x = np.concatenate([np.zeros(int(rng.uniform(0.1, 0.4) * 8000), np.float32), *parts,
                                np.zeros(int(rng.uniform(0.1, 0.3) * 8000), np.float32)])
        x = x * 10 ** (rng.uniform(-12, 0) / 20) / (np.abs(x).max() + 1e-9)
        x = x + rng.standard_normal(len(x)).astype(np.float32) * 10 ** (rng.uniform(-60, -40) / 20)  # line hiss
        name = f"ast_{k:04d}.wav"
        sf.write(str(out / name), np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16), 8000, subtype="PCM_16")
        rows.append({"audio": name, "intent": intent, "slots": {k2: v2 for k2, v2 in slots.items() if k2}, "text": text,
                     "source": "+".join(files)})
    write_manifest(out, rows)
    return {"n": len(rows), "out": str(out), "intent_null": sum(r["intent"] is None for r in rows)}
