"""The numpy front end's 8 -> 16 kHz interpolator."""

import numpy as np
import pytest

from engine.features import _UP_FIR, upsample2


@pytest.mark.parametrize("n", [0, 1, 5, 23, 24, 801, 32000])
def test_polyphase_upsample_is_the_half_band_filter_of_the_zero_stuffed_signal(n: int) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    y = upsample2(x)
    assert y.shape == (2 * n,) and y.dtype == np.float32
    if n:
        stuffed = np.zeros(2 * n, np.float32)
        stuffed[::2] = x
        ref = np.convolve(stuffed, _UP_FIR)[23 : 23 + 2 * n]  # centred: output i lines up with input i
        np.testing.assert_allclose(y, ref, atol=1e-6)
        np.testing.assert_array_equal(y[::2], x)  # a half-band interpolator keeps the samples it had


def test_upsampled_tone_keeps_its_frequency() -> None:
    t = np.arange(8000) / 8000
    y = upsample2(np.sin(2 * np.pi * 1000 * t).astype(np.float32))
    spec = np.abs(np.fft.rfft(y[1000:-1000]))
    assert abs(np.argmax(spec) * 16000 / len(y[1000:-1000]) - 1000) < 5
    assert spec[np.fft.rfftfreq(len(y[1000:-1000]), 1 / 16000) > 4500].max() < 0.01 * spec.max()  # no image
