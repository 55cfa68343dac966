"""Lossy speech codecs a caller's voice may pass through before our 8 kHz G.711 leg.

Mobile networks carry AMR-NB (4.75-12.2 kbit/s), older networks and some trunks GSM full rate, VoIP
legs Opus or G.723.1. They remove what a waveform coder keeps (fine spectral detail, some formant
precision) and add their own artefacts, so a model trained on G.711 audio alone reads them worse:
understand-v9 on the real asterisk speaker went from 0.990 intent clean to 0.940 through AMR-NB 5.15k
and 0.925 through Opus 8k. Each codec here encodes and decodes for real: AMR-NB, Opus and G.723.1
through PyAV's bundled FFmpeg (libopencore-amrnb, libopus; PyAV comes with aiortc), GSM full rate
through sox.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import soundfile as sf
from tqdm import tqdm

from engine.training.cache import derived_dirs, local_audio_path, read_clip_8k, read_manifest, write_manifest

SR = 8000
# name -> the bit rates drawn from; weights: how often a random draw picks each codec
CODECS: dict[str, tuple[int, ...]] = {
    "amr-nb": (4750, 5150, 5900, 6700, 7400, 7950, 10200, 12200),
    "gsm-fr": (13000,),
    "opus": (6000, 8000, 12000, 16000),
    "g723.1": (6300,),
    "g726": (16000, 24000, 32000),  # ADPCM (DECT, some VoIP): never drawn for training, a held-out codec
}
WEIGHTS = {"amr-nb": 0.5, "gsm-fr": 0.2, "opus": 0.2, "g723.1": 0.1}
_AV = {"amr-nb": ("libopencore_amrnb", "amr"), "opus": ("libopus", "ogg"), "g723.1": ("g723_1", "wav"),
       "g726": ("g726", "wav")}
MAX_DELAY = 800  # samples (100 ms): codec look-ahead and frame padding are well under this


class CodecError(ValueError):
    pass


def parse(spec: str) -> tuple[str, int]:
    """"amr-nb:5150" -> ("amr-nb", 5150); a bare name takes the codec's lowest rate (the hardest)."""
    name, _, rate = spec.partition(":")
    if name not in CODECS:
        raise CodecError(f"unknown codec {name!r}; known: {', '.join(CODECS)}")
    bitrate = int(rate) if rate else CODECS[name][0]
    if bitrate not in CODECS[name]:
        raise CodecError(f"{name} has no {bitrate} bit/s mode; known: {', '.join(map(str, CODECS[name]))}")
    return name, bitrate


def draw(rng: np.random.Generator) -> tuple[str, int]:
    """A random codec and bit rate (AMR-NB half the time: most calls today reach a trunk from a mobile)."""
    names = list(WEIGHTS)
    name = names[int(rng.choice(len(names), p=np.array([WEIGHTS[n] for n in names])))]
    return name, int(rng.choice(CODECS[name]))


def _to_int16(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.int16:
        return x
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


def _via_av(pcm: np.ndarray, name: str, bitrate: int) -> np.ndarray:
    import av

    codec, fmt = _AV[name]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=SR)
        stream.bit_rate = bitrate
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SR
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    buf.seek(0)
    parts = []
    with av.open(buf, "r") as inp:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SR)  # Opus decodes at 48 kHz
        for decoded in inp.decode(audio=0):
            parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(decoded)]
        parts += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int16)


def _via_sox_gsm(pcm: np.ndarray) -> np.ndarray:
    with tempfile.TemporaryDirectory() as td:
        src, enc, dec = (os.path.join(td, n) for n in ("in.wav", "enc.gsm", "out.wav"))
        sf.write(src, pcm, SR, subtype="PCM_16")
        for args in ([src, "-r", str(SR), "-c", "1", enc], [enc, "-b", "16", dec]):
            done = subprocess.run(["sox", *args], capture_output=True, timeout=30)
            if done.returncode != 0:
                raise CodecError(f"sox gsm failed: {done.stderr.decode(errors='replace')[:200]}")
        return sf.read(dec, dtype="int16")[0]


def _align(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y shifted back by the codec's delay (the lag of best cross-correlation within MAX_DELAY), cut or
    zero-padded to len(x): labels such as end of turn refer to where the clip ends."""
    n = len(x)
    if len(y) == 0:
        return np.zeros(n, np.float32)
    nfft = 1 << int(np.ceil(np.log2(len(x) + len(y))))
    corr = np.fft.irfft(np.fft.rfft(y, nfft) * np.conj(np.fft.rfft(x, nfft)), nfft)[: MAX_DELAY + 1]
    lag = int(np.argmax(corr))
    out = np.zeros(n, np.float32)
    seg = y[lag : lag + n]
    out[: len(seg)] = seg
    return out


def transcode(x: np.ndarray, name: str, bitrate: int) -> np.ndarray:
    """8 kHz mono audio (int16, or float in [-1, 1]) -> float32 in [-1, 1] after encode + decode, same
    length, delay removed."""
    pcm = _to_int16(np.asarray(x).reshape(-1))
    if len(pcm) == 0:
        return np.zeros(0, np.float32)
    if name == "gsm-fr":
        y = _via_sox_gsm(pcm)
    elif name in _AV:
        y = _via_av(pcm, name, bitrate)
    else:
        raise CodecError(f"unknown codec {name!r}")
    return _align(y.astype(np.float32) / 32768.0, pcm.astype(np.float32) / 32768.0)


def _clip_seed(seed: int, audio: str) -> int:
    return int(hashlib.sha1(f"{seed}|codec|{audio}".encode()).hexdigest()[:8], 16)


def transcode_dir(src: str | Path, dst: str | Path, codecs: Sequence[str] = (), share: float = 1.0,
                  seed: int = 0) -> dict[str, Any]:
    """Every clip of SRC's manifest, written under DST with DST/manifest.jsonl: a share of them (decided
    per clip from seed and path, so a rerun is identical) passed through the codec ("amr-nb:5150"), or
    through a random codec and rate when none is given; the rest copied as they are. Transcoded rows get
    "codec": "amr-nb:5150"; all other fields (labels) are kept. With several codecs, each writes a
    subdirectory (DST/amr-nb_5150/, ...) and DST/manifest.jsonl pools them: one robustness set whose
    clips pair up with the source's, codec by codec."""
    src, dst = derived_dirs(src, dst, CodecError)
    if not 0.0 <= share <= 1.0:
        raise CodecError(f"share must be in [0, 1], got {share}")
    specs = [parse(c) for c in codecs]  # all checked before anything is written
    rows = read_manifest(src)
    if len(specs) <= 1:
        out_rows, counts = _transcode_rows(src, dst, rows, specs[0] if specs else None, share, seed)
        sets = None
    else:
        out_rows, counts, sets = [], {}, []
        for name, rate in specs:
            tag = f"{name}_{rate}"
            sub_rows, sub_counts = _transcode_rows(src, dst / tag, rows, (name, rate), share, seed)
            write_manifest(dst / tag, sub_rows)
            out_rows += [dict(r, audio=f"{tag}/{r['audio']}") for r in sub_rows]
            counts.update(sub_counts)
            sets.append(tag)
    write_manifest(dst, out_rows)
    info: dict[str, Any] = {"out": str(dst), "clips": len(out_rows), "transcoded": sum(counts.values()),
                            "codecs": dict(sorted(counts.items()))}
    if sets:
        info["sets"] = sets
    return info


def _transcode_rows(src: Path, dst: Path, rows: list[dict[str, Any]], fixed: tuple[str, int] | None, share: float,
                    seed: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    dst.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    out_rows = []
    for row in tqdm(rows, desc=f"transcode {fixed[0]}:{fixed[1]}" if fixed else "transcode", unit="clip"):
        rel = local_audio_path(row["audio"], CodecError)
        x = read_clip_8k(src / row["audio"], row["audio"], CodecError, "int16")
        rng = np.random.default_rng(_clip_seed(seed, row["audio"]))
        new = dict(row, audio=rel.as_posix())
        if rng.random() < share:
            name, rate = fixed or draw(rng)
            x = _to_int16(transcode(x, name, rate))
            new["codec"] = f"{name}:{rate}"
            counts[new["codec"]] = counts.get(new["codec"], 0) + 1
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(dst / rel, x, SR, subtype="PCM_16")
        out_rows.append(new)
    return out_rows, counts
