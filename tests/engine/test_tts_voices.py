"""Every training/test voice the synthesizer lists can speak on this machine: a voice whose package is
missing would otherwise drop its clips from a split (counted as render errors) and skew every figure."""

import numpy as np
import pytest

from engine.training.tts import Prosody, Voice, all_voices, synthesize

VOICES = sorted({(v.engine, v.name) for v in all_voices()})
ONE_PER_ENGINE = {e: n for e, n in VOICES}


@pytest.mark.parametrize("engine", sorted(ONE_PER_ENGINE))
def test_each_engine_speaks(engine: str) -> None:
    x = synthesize(Voice(engine, ONE_PER_ENGINE[engine]), "four two seven", Prosody(rate=0.9))
    assert x.dtype == np.float32 and len(x) > 0.3 * 8000
    assert float(np.sqrt(np.mean(x**2))) > 1e-3


def test_every_festival_and_flite_voice_loads() -> None:
    for engine, name in VOICES:
        if engine in ("festival", "flite"):
            assert len(synthesize(Voice(engine, name), "yes")) > 0, f"{engine}:{name}"
