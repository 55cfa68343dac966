"""A telephone channel simulator: what a caller's voice goes through before it reaches the bot.

Level changes, room reverberation, background noise or babble at 5-30 dB SNR, 300-3400 Hz band-pass,
G.711 mu-law/A-law, 20 ms packet loss, occasional clipping. All randomness from the given Generator.
"""

from __future__ import annotations

import numpy as np

SR = 8000


def _fft_filter(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    n = len(x)
    nfft = 1 << int(np.ceil(np.log2(max(n, 2))))
    spec = np.fft.rfft(x, nfft)
    f = np.fft.rfftfreq(nfft, 1 / SR)
    # soft edges (~100 Hz roll-off) rather than a brick wall
    gain = 1 / (1 + np.exp(-(f - lo) / 40)) * 1 / (1 + np.exp((f - hi) / 80))
    return np.fft.irfft(spec * gain, nfft)[:n].astype(np.float32)


def mulaw(x: np.ndarray) -> np.ndarray:
    mu = 255.0
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    q = np.round(y * 127) / 127
    return (np.sign(q) * (np.expm1(np.abs(q) * np.log1p(mu)) / mu)).astype(np.float32)


def alaw(x: np.ndarray) -> np.ndarray:
    a = 87.6
    ax = np.abs(x)
    y = np.where(ax < 1 / a, a * ax / (1 + np.log(a)), (1 + np.log(np.maximum(a * ax, 1e-12))) / (1 + np.log(a)))
    q = np.round(y * 127) / 127
    inv = np.where(q < 1 / (1 + np.log(a)), q * (1 + np.log(a)) / a, np.exp(q * (1 + np.log(a)) - 1) / a)
    return (np.sign(x) * inv).astype(np.float32)


def colored_noise(n: int, rng: np.random.Generator, kind: str) -> np.ndarray:
    w = rng.standard_normal(n).astype(np.float32)
    if kind == "white":
        return w
    spec = np.fft.rfft(w)
    f = np.maximum(np.fft.rfftfreq(n, 1 / SR), 20.0)
    spec = spec / (np.sqrt(f) if kind == "pink" else f)
    return np.fft.irfft(spec, n).astype(np.float32)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-12))


def reverb(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rt60 = rng.uniform(0.15, 0.6)
    n = int(rt60 * SR)
    t = np.arange(n) / SR
    ir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    ir[0] = 1.0 / rng.uniform(0.3, 1.0)  # direct path vs reverberant energy
    ir = ir / np.sqrt(np.sum(ir**2))
    nfft = 1 << int(np.ceil(np.log2(len(x) + n)))
    y = np.fft.irfft(np.fft.rfft(x, nfft) * np.fft.rfft(ir, nfft), nfft)[: len(x)]
    return (y * _rms(x) / max(_rms(y), 1e-9)).astype(np.float32)


def telephone(
    speech: np.ndarray,
    rng: np.random.Generator,
    babble: list[np.ndarray] | None = None,
    lead_s: tuple[float, float] = (0.1, 0.5),
    tail_s: tuple[float, float] = (0.1, 0.4),
    clean: bool = False,
    level_db_range: tuple[float, float] = (-26.0, -1.0),
) -> np.ndarray:
    """Speech (8 kHz float) -> what arrives from a phone call, as int16. clean=True: band-pass and codec only."""
    x = speech.astype(np.float32)
    x = np.concatenate([np.zeros(int(rng.uniform(*lead_s) * SR), np.float32), x,
                        np.zeros(int(rng.uniform(*tail_s) * SR), np.float32)])
    if not clean:
        if rng.random() < 0.3:
            x = reverb(x, rng)
        if rng.random() < 0.85:
            snr = rng.uniform(5, 30)
            if babble and rng.random() < 0.35:
                b = babble[int(rng.integers(len(babble)))]
                start = int(rng.integers(0, max(1, len(b) - len(x))))
                noise = np.resize(b[start:], len(x)).astype(np.float32)
            else:
                noise = colored_noise(len(x), rng, str(rng.choice(["white", "pink", "brown"])))
            speech_rms = _rms(speech)
            noise = noise * (speech_rms / max(_rms(noise), 1e-9)) * 10 ** (-snr / 20)
            x = x + noise
    x = _fft_filter(x, 300.0, 3400.0)
    # level: callers are anywhere from quiet to hot
    peak = float(np.max(np.abs(x))) + 1e-9
    level_db = rng.uniform(*level_db_range) if not clean else -6.0
    x = x / peak * 10 ** (level_db / 20)
    if not clean and rng.random() < 0.05:
        x = np.clip(x * rng.uniform(1.5, 4.0), -1, 1)  # hot microphone clipping
    x = mulaw(x) if rng.random() < 0.5 else alaw(x)
    if not clean and rng.random() < 0.3:
        frame = SR // 50
        loss = rng.uniform(0.01, 0.05)
        for i in range(len(x) // frame):
            if rng.random() < loss:
                x[i * frame : (i + 1) * frame] = 0.0
    return np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)
