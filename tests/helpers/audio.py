"""Caller audio for tests: espeak-ng / flite speech through a phone-like channel (300-3400 Hz,
G.711 mu-law), noise bursts, coughs and echo, all 8 kHz mono int16."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from telephony import g711

SR = 8000


def _resample(x: np.ndarray, sr: int) -> np.ndarray:
    if sr == SR:
        return x.astype(np.float32)
    n = int(round(len(x) * SR / sr))
    return np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x).astype(np.float32)


def phone_channel(x: np.ndarray, level_dbfs: float = -20.0) -> np.ndarray:
    """Band-limit to 300-3400 Hz, set the speech level, mu-law round trip (what Twilio delivers)."""
    x = x.astype(np.float32)
    n = len(x)
    nfft = 1 << int(np.ceil(np.log2(max(n, 2))))
    spec = np.fft.rfft(x, nfft)
    f = np.fft.rfftfreq(nfft, 1 / SR)
    spec *= (f >= 300) & (f <= 3400)
    y = np.fft.irfft(spec, nfft)[:n]
    rms = float(np.sqrt(np.mean(y[np.abs(y) > 1e-4] ** 2))) if np.any(np.abs(y) > 1e-4) else 1.0
    y = y / max(rms, 1e-9) * (10 ** (level_dbfs / 20)) * 32767
    pcm = np.clip(y, -32768, 32767).astype(np.int16)
    return g711.ulaw_decode(g711.ulaw_encode(pcm))


def synth(text: str, voice: str = "en-us", engine: str = "espeak-ng", rate: int = 165,
          level_dbfs: float = -20.0) -> np.ndarray:
    """Speech for `text` as a caller would sound on the phone."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "s.wav"
        if engine == "flite" and shutil.which("flite"):
            subprocess.run(["flite", "-t", text, "-o", str(out)], check=True, capture_output=True)
        else:
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(out), text], check=True,
                           capture_output=True)
        x, sr = sf.read(str(out), dtype="float32", always_2d=True)
    return phone_channel(_resample(x[:, 0], sr), level_dbfs)


def silence(ms: int) -> np.ndarray:
    return np.zeros(SR * ms // 1000, dtype=np.int16)


def noise_burst(ms: int, level_dbfs: float = -15.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SR * ms // 1000).astype(np.float32)
    return phone_channel(x, level_dbfs)


def cough(seed: int = 1, level_dbfs: float = -12.0) -> np.ndarray:
    """Two short broadband bursts (~120 ms + ~80 ms) with a fast decay: a cough, not speech."""
    rng = np.random.default_rng(seed)
    parts = []
    for ms in (120, 80):
        n = SR * ms // 1000
        env = np.exp(-np.linspace(0, 5, n)).astype(np.float32)
        parts.append(rng.standard_normal(n).astype(np.float32) * env)
        parts.append(np.zeros(SR * 60 // 1000, np.float32))
    return phone_channel(np.concatenate(parts), level_dbfs)


def attenuate(pcm: np.ndarray, db: float) -> np.ndarray:
    return (pcm.astype(np.float32) * (10 ** (db / 20))).astype(np.int16)


def write_wav(path: Path, pcm: np.ndarray) -> Path:
    sf.write(str(path), pcm, SR, subtype="PCM_16")
    return path


def write_clip_set(root: Path, clips: list[np.ndarray], labels: dict) -> Path:
    """A small data dir: root/c<k>.wav for each clip and a manifest.jsonl giving each the same labels."""
    root.mkdir()
    rows = []
    for k, pcm in enumerate(clips):
        write_wav(root / f"c{k}.wav", pcm)
        rows.append({"audio": f"c{k}.wav", **labels})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def derived_rows(src: Path, out: Path, tag: str) -> list[dict]:
    """OUT's manifest rows (a set derived from SRC by transcode or add-noise), checking that every clip whose row
    lacks `tag` is SRC's clip bit for bit and every clip with it was changed."""
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    for r in rows:
        y = sf.read(out / r["audio"], dtype="int16")[0]
        x = sf.read(src / r["audio"], dtype="int16")[0]
        assert np.array_equal(y, x) == (tag not in r), r  # untouched clips are copied bit for bit
    return rows
