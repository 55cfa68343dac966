"""Noise-robustness sets: a data dir's clips with background noise mixed in at fixed signal-to-noise ratios.

Callers ring from cars, streets and open-plan offices. Training mixes noise at a random 5-30 dB into 85 % of
clips, but one random SNR per clip says nothing about where understanding breaks down. `bot engine add-noise`
writes the same clips at each requested SNR (one subdirectory per noise kind and level, pooled by one
manifest), so `bot engine eval` reads a robustness curve off one run: its breakdown groups clips by
`noise` ("babble 10 dB").

The SNR is measured against the speech itself (the clip's active region, not its leading and trailing
silence), so "10 dB" means the same for a 1 s "agent" and a 6 s read-out. Babble is five talkers at once,
drawn from the held-out *test* voices saying unrelated sentences: a training voice's babble would be
background the model has already learned to ignore.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import soundfile as sf
from tqdm import tqdm

from engine.training.cache import derived_dirs, local_audio_path, read_clip_8k, read_manifest, write_manifest
from engine.training.channel import colored_noise

SR = 8000
KINDS = ("white", "pink", "brown", "babble")
BABBLE_SENTENCES = ["the meeting is at three", "did you see the news this morning", "we should get lunch later",
                    "my sister is visiting next week", "what time does the game start", "i left my keys in the car",
                    "the bus was late again", "can you pass me that folder"]


class NoiseError(ValueError):
    """A request add-noise cannot honour (unknown kind, an SNR outside [-10, 60] dB, SRC = DST)."""


def speech_rms(x: np.ndarray, frame: int = 160, floor_db: float = -35.0) -> float:
    """RMS over the frames within floor_db of the loudest frame: the speech, not the pauses around it."""
    x = np.asarray(x, np.float64)
    n = len(x) // frame
    if n == 0:
        return float(np.sqrt(np.mean(x**2) + 1e-12)) if len(x) else 0.0
    e = (x[: n * frame].reshape(n, frame) ** 2).mean(1) + 1e-12
    on = e[10 * np.log10(e / e.max()) > floor_db]
    return float(np.sqrt(on.mean()))


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """speech (float, [-1, 1]) + noise scaled so that speech_rms / noise rms = snr_db; the noise is looped or
    cut to the clip's length, and the sum is scaled down only if it would clip."""
    x = np.asarray(speech, np.float32)
    n = np.resize(np.asarray(noise, np.float32), len(x))
    n_rms = float(np.sqrt(np.mean(n.astype(np.float64) ** 2) + 1e-12))
    y = x + n * (speech_rms(x) / max(n_rms, 1e-9)) * 10 ** (-snr_db / 20)
    peak = float(np.max(np.abs(y))) if len(y) else 0.0
    return (y / peak if peak > 1.0 else y).astype(np.float32)


def make_babble(n: int = 6, seed: int = 0, talkers: int = 5, seconds: float = 8.0,
                split: str = "test") -> list[np.ndarray]:
    """n loops of `talkers` espeak voices of one split speaking at once (synth.make_babble, with sentences
    unlike training's), each normalised to unit RMS: the held-out test voices for robustness sets, the
    training voices for training augmentation."""
    from engine.training import synth

    mixes = synth.make_babble(n, seed, split=split, sentences=BABBLE_SENTENCES, seconds=seconds, talkers=talkers)
    return [m / max(float(np.sqrt(np.mean(m.astype(np.float64) ** 2))), 1e-9) for m in mixes]


def _noise_for(kind: str, n: int, rng: np.random.Generator, babble: list[np.ndarray]) -> np.ndarray:
    if kind == "babble":
        b = babble[int(rng.integers(len(babble)))]
        return np.resize(np.roll(b, -int(rng.integers(0, len(b)))), n)
    return colored_noise(n, rng, kind)


def augment_dir(src: str | Path, dst: str | Path, share: float = 0.5, snr_range: tuple[float, float] = (0.0, 20.0),
                seed: int = 0) -> dict[str, Any]:
    """Training augmentation: a share of SRC's clips (chosen per clip from seed and path) get one more layer of
    noise, babble of *training* voices half the time, else white/pink/brown, at an SNR drawn from snr_range;
    the rest are copied. DST/manifest.jsonl keeps every label; noisy rows get "noise": "pink 7.3 dB"."""
    src, dst = derived_dirs(src, dst, NoiseError)
    if not 0.0 <= share <= 1.0:
        raise NoiseError(f"share must be in [0, 1], got {share}")
    lo, hi = snr_range
    if not -10.0 <= lo <= hi <= 60.0:
        raise NoiseError(f"SNR range {lo}..{hi} dB is not within [-10, 60]")
    rows = read_manifest(src)
    babble = make_babble(n=12, seed=seed, split="train")
    out, noisy = [], 0
    for row in tqdm(rows, desc="add noise", unit="clip"):
        x = read_clip_8k(src / row["audio"], row["audio"], NoiseError, "float32")
        rng = _clip_rng(seed, "augment", row["audio"])
        new = dict(row, audio=local_audio_path(row["audio"], NoiseError).as_posix())
        if rng.random() < share:
            kind = "babble" if rng.random() < 0.5 else str(rng.choice(["white", "pink", "brown"]))
            snr = float(rng.uniform(lo, hi))
            x = mix_at_snr(x, _noise_for(kind, len(x), rng, babble), snr)
            new["noise"] = f"{kind} {snr:.1f} dB"
            noisy += 1
        (dst / new["audio"]).parent.mkdir(parents=True, exist_ok=True)
        sf.write(dst / new["audio"], x, SR, subtype="PCM_16")
        out.append(new)
    write_manifest(dst, out)
    return {"out": str(dst), "clips": len(out), "noisy": noisy}


def _clip_rng(seed: int, kind: str, audio: str) -> np.random.Generator:
    # the same noise for a clip at every SNR of one kind: the curve moves with the level only
    return np.random.default_rng(int(hashlib.sha1(f"{seed}|{kind}|{audio}".encode()).hexdigest()[:8], 16))


def _tag(kind: str, snr: float) -> str:
    return f"{kind}_{snr:g}db".replace("-", "m")


def noisy_dir(src: str | Path, dst: str | Path, snrs: Sequence[float], kinds: Sequence[str] = ("babble",),
              seed: int = 0) -> dict[str, Any]:
    """Every clip of SRC's manifest at every (kind, SNR): DST/<kind>_<snr>db/ with its own manifest, and
    DST/manifest.jsonl pooling them with "noise": "babble 10 dB" added to each row (labels kept)."""
    src, dst = derived_dirs(src, dst, NoiseError)
    if not snrs:
        raise NoiseError("give at least one --snr")
    for k in kinds:
        if k not in KINDS:
            raise NoiseError(f"unknown noise {k!r} (one of {', '.join(KINDS)})")
    for s in snrs:
        if not -10.0 <= float(s) <= 60.0:
            raise NoiseError(f"SNR {s} dB is outside [-10, 60]")
    rows = read_manifest(src)
    babble = make_babble(seed=seed) if "babble" in kinds else []
    pooled: list[dict[str, Any]] = []
    sets = []
    for kind in kinds:
        for snr in snrs:
            tag = _tag(kind, float(snr))
            sub = dst / tag
            sub.mkdir(parents=True, exist_ok=True)
            sub_rows = []
            for row in tqdm(rows, desc=f"noise {tag}", unit="clip"):
                x = read_clip_8k(src / row["audio"], row["audio"], NoiseError, "float32")
                noise = _noise_for(kind, len(x), _clip_rng(seed, kind, row["audio"]), babble)
                rel = local_audio_path(row["audio"], NoiseError)
                (sub / rel).parent.mkdir(parents=True, exist_ok=True)
                sf.write(sub / rel, mix_at_snr(x, noise, float(snr)), SR, subtype="PCM_16")
                sub_rows.append(dict(row, audio=rel.as_posix(), noise=f"{kind} {float(snr):g} dB"))
            write_manifest(sub, sub_rows)
            pooled += [dict(r, audio=f"{tag}/{r['audio']}") for r in sub_rows]
            sets.append(tag)
    write_manifest(dst, pooled)
    return {"out": str(dst), "clips": len(pooled), "sets": sets}
