"""Telephone codecs for codec-robustness sets and training augmentation: real encoders, real speech."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bot.cli import main
from engine.training.codecs import CODECS, WEIGHTS, CodecError, draw, parse, transcode, transcode_dir
from tests.helpers.audio import derived_rows, silence, synth, write_clip_set, write_wav


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return np.concatenate([silence(200), synth("my account number is four four two one"), silence(300)])


def _lag(a: np.ndarray, b: np.ndarray, max_lag: int = 200) -> int:
    """The shift of b against a with the highest correlation, in [-max_lag, max_lag]."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    scores = {k: float(np.dot(a[max(0, -k): len(a) - max(0, k)], b[max(0, k): len(b) - max(0, -k)]))
              for k in range(-max_lag, max_lag + 1)}
    return max(scores, key=lambda k: scores[k])


@pytest.mark.parametrize("name,bitrate", [(n, r) for n, rates in CODECS.items() for r in (rates[0], rates[-1])])
def test_every_codec_encodes_and_decodes_real_speech_in_time(speech: np.ndarray, name: str, bitrate: int) -> None:
    x = speech.astype(np.float32) / 32768.0
    y = transcode(speech, name, bitrate)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.all(np.isfinite(y)) and np.abs(y).max() <= 1.0
    assert not np.allclose(y, x, atol=1e-4), "a lossy codec must change the waveform"
    assert abs(_lag(x, y)) <= 2, "the codec's delay is removed"
    assert np.corrcoef(x, y)[0, 1] > 0.6, "what comes out is still the same speech"
    # the speech stays where it was: the leading 200 ms of silence stays near silent
    assert np.sqrt(np.mean(y[:1200] ** 2)) < 0.1 * np.sqrt(np.mean(y ** 2))


def test_lower_bit_rates_lose_more(speech: np.ndarray) -> None:
    x = speech.astype(np.float32) / 32768.0

    def err(rate: int) -> float:
        return float(np.mean((transcode(speech, "opus", rate) - x) ** 2))

    assert err(6000) > err(16000)


def test_empty_audio_and_float_input() -> None:
    assert transcode(np.zeros(0, np.int16), "amr-nb", 12200).shape == (0,)
    y = transcode(np.full(800, 0.01, np.float32), "gsm-fr", 13000)
    assert y.shape == (800,)


def test_parse_and_draw() -> None:
    assert parse("amr-nb:5150") == ("amr-nb", 5150)
    assert parse("gsm-fr") == ("gsm-fr", 13000)
    with pytest.raises(CodecError, match="unknown codec"):
        parse("mp3")
    with pytest.raises(CodecError, match="no 9999 bit/s mode"):
        parse("amr-nb:9999")
    draws = [draw(np.random.default_rng(s)) for s in range(400)]
    assert draws == [draw(np.random.default_rng(s)) for s in range(400)]  # deterministic per generator
    names = {n for n, _ in draws}
    assert names == set(WEIGHTS) and "g726" not in names  # the held-out codec is never drawn
    assert all(r in CODECS[n] for n, r in draws)
    assert 0.4 < sum(n == "amr-nb" for n, _ in draws) / len(draws) < 0.6


def _dataset(root: Path, speech: np.ndarray) -> Path:
    """Two sets merged by a manifest that reaches into both with ../ paths (as data/synth32 does)."""
    for name in ("a", "b"):
        (root / name).mkdir()
        write_wav(root / name / "clip_0.wav", speech)
    merged = root / "merged"
    merged.mkdir()
    rows = [{"audio": f"../{name}/clip_0.wav", "intent": "pay_bill", "slots": {"account_number": "4421"},
             "text": "my account number is four four two one"} for name in ("a", "b")]
    rows.append({"audio": "../a/clip_0.wav", "intent": None, "slots": {}, "text": "x"})
    (merged / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return merged


def test_transcode_dir_keeps_labels_writes_inside_and_is_repeatable(tmp_path: Path, speech: np.ndarray) -> None:
    src = _dataset(tmp_path, speech)
    out = tmp_path / "out"
    info = transcode_dir(src, out, codecs=["amr-nb:5150"])
    assert info == {"out": str(out), "clips": 3, "transcoded": 3, "codecs": {"amr-nb:5150": 3}}
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["audio"] for r in rows] == ["a/clip_0.wav", "b/clip_0.wav", "a/clip_0.wav"]
    assert all(r["codec"] == "amr-nb:5150" for r in rows)
    assert rows[0]["slots"] == {"account_number": "4421"} and rows[2]["intent"] is None
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.wav")) == \
        ["a/clip_0.wav", "b/clip_0.wav", "out/a/clip_0.wav", "out/b/clip_0.wav"]  # sources untouched
    y, sr = sf.read(out / "a" / "clip_0.wav", dtype="int16")
    assert sr == 8000 and len(y) == len(speech) and not np.array_equal(y, speech)

    again = tmp_path / "again"
    transcode_dir(src, again, codecs=["amr-nb:5150"])
    assert np.array_equal(sf.read(again / "a" / "clip_0.wav", dtype="int16")[0], y)


def test_several_codecs_make_one_pooled_set(tmp_path: Path, speech: np.ndarray) -> None:
    src = _dataset(tmp_path, speech)
    out = tmp_path / "pooled"
    info = transcode_dir(src, out, codecs=["gsm-fr", "opus:8000"])
    assert info["sets"] == ["gsm-fr_13000", "opus_8000"] and info["clips"] == 6
    assert info["codecs"] == {"gsm-fr:13000": 3, "opus:8000": 3}
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["audio"] for r in rows[:3]] == ["gsm-fr_13000/a/clip_0.wav", "gsm-fr_13000/b/clip_0.wav",
                                              "gsm-fr_13000/a/clip_0.wav"]
    assert all((out / r["audio"]).exists() for r in rows)
    assert [r["text"] for r in rows] == [r["text"] for r in rows[:3]] * 2  # paired with the source, codec by codec
    sub = [json.loads(line) for line in (out / "opus_8000" / "manifest.jsonl").read_text().splitlines()]
    assert [r["audio"] for r in sub] == ["a/clip_0.wav", "b/clip_0.wav", "a/clip_0.wav"]  # each part stands alone
    with pytest.raises(CodecError, match="unknown codec"):
        transcode_dir(src, tmp_path / "bad", codecs=["gsm-fr", "mp3"])
    assert not (tmp_path / "bad").exists()  # checked before anything was written


def test_share_and_random_codecs_are_decided_per_clip_from_the_seed(tmp_path: Path, speech: np.ndarray) -> None:
    src = write_clip_set(tmp_path / "src", [speech[: 4000 + 80 * k] for k in range(12)],
                         {"intent": "goodbye", "slots": {}, "text": "bye"})
    a = transcode_dir(src, tmp_path / "a", share=0.5, seed=3)
    b = transcode_dir(src, tmp_path / "b", share=0.5, seed=3)
    assert a["codecs"] == b["codecs"] and 0 < a["transcoded"] < 12
    derived_rows(src, tmp_path / "a", "codec")
    none = transcode_dir(src, tmp_path / "none", share=0.0)
    assert none["transcoded"] == 0


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sf.write(src / "wide.wav", np.zeros(1600, np.int16), 16000, subtype="PCM_16")
    (src / "manifest.jsonl").write_text(json.dumps({"audio": "wide.wav", "intent": "goodbye"}) + "\n")
    with pytest.raises(CodecError, match="expected 8 kHz mono"):
        transcode_dir(src, tmp_path / "out")
    with pytest.raises(CodecError, match="must differ"):
        transcode_dir(src, src)
    assert main(["engine", "transcode", str(src), str(tmp_path / "o2"), "--codec", "mp3"]) == 2
    assert "unknown codec 'mp3'" in capsys.readouterr().err
    assert main(["engine", "transcode", str(src), str(tmp_path / "o3")]) == 2
    assert "expected 8 kHz mono" in capsys.readouterr().err
