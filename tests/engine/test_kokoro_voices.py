"""Kokoro voices (engine/training/kokoro.py): they speak, their rate control works, espeak-ng's phonemes map
onto Kokoro's symbols without loss, and train and held-out Kokoro voices share no base voice."""

import numpy as np
import pytest

from engine.training import kokoro, templates
from engine.training.tts import Prosody, Voice, synthesize


@pytest.fixture(scope="module")
def voice() -> kokoro.Kokoro:
    return kokoro.shared()  # the instance synthesize() uses, so the graph loads once


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


@pytest.mark.parametrize("name", ["alpha", "kumo", "gongitsune+tebukuro"])
def test_voices_speak(name: str) -> None:
    x = synthesize(Voice("kokoro", name), "four two seven", Prosody(rate=0.9))
    assert x.dtype == np.float32 and 0.4 * 8000 < len(x) < 4 * 8000
    assert _rms(x) > 1e-3 and np.all(np.isfinite(x))


def test_rate_changes_duration(voice: kokoro.Kokoro) -> None:
    text = "i would like to pay my bill please"
    slow, fast = voice.render("nezumi", text, 0.8), voice.render("nezumi", text, 1.5)
    assert len(fast) < 0.75 * len(slow)


def test_blend_is_between_its_voices(voice: kokoro.Kokoro) -> None:
    a, b, ab = voice.style("alpha"), voice.style("kumo"), voice.style("alpha+kumo")
    assert np.allclose(ab, (a + b) / 2, atol=1e-6)
    with pytest.raises(kokoro.KokoroError):
        voice.style("nobody")


def test_espeak_phonemes_map_onto_kokoro_symbols(voice: kokoro.Kokoro) -> None:
    sentences = [t.replace("{", "").replace("}", "") for ts in templates.PHRASES.values() for t in ts[:6]]
    lost: set[str] = set()
    for s in sentences[:120]:
        lost |= {c for c in kokoro.phonemes(s) if c not in voice.vocab}
    assert not lost, f"espeak symbols Kokoro has no id for: {sorted(lost)}"


def test_train_and_held_out_share_no_base_voice() -> None:
    base = lambda names: {n for v in names for n in v.split("+")}  # noqa: E731
    assert not base(kokoro.TRAIN) & base(kokoro.HELD_OUT)
    assert base(kokoro.TRAIN) | base(kokoro.HELD_OUT) == {b.split("_", 1)[1] for b in kokoro.BASE}
