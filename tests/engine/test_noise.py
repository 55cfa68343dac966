"""Noise-robustness sets and noise augmentation (`bot engine add-noise`): SNR measured against the speech,
labels kept, repeatable, bad requests refused; `bot engine eval` reads the curve off one pooled set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bot.cli import main
from engine.training.evaluate import evaluate
from engine.training.noise import NoiseError, augment_dir, make_babble, mix_at_snr, noisy_dir, speech_rms
from tests.helpers.audio import derived_rows, silence, synth, write_clip_set, write_wav


def _db(a: float, b: float) -> float:
    return 20 * np.log10(a / b)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return np.concatenate([silence(400), synth("my account number is four four two one"), silence(600)])


def _dataset(root: Path, speech: np.ndarray) -> Path:
    src = root / "src"
    src.mkdir()
    write_wav(src / "acct.wav", speech)
    write_wav(src / "bye.wav", np.concatenate([silence(200), synth("goodbye"), silence(200)]))
    rows = [{"audio": "acct.wav", "intent": None, "slots": {"account_number": "4421"},
             "text": "my account number is four four two one"},
            {"audio": "bye.wav", "intent": "goodbye", "slots": {}, "text": "goodbye"}]
    (src / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src


def test_the_snr_is_measured_against_the_speech_not_the_silence_around_it(speech: np.ndarray) -> None:
    x = speech.astype(np.float32) / 32768
    tone = 0.1 * np.sin(np.arange(8000) * 2 * np.pi * 440 / 8000).astype(np.float32)
    padded = np.concatenate([np.zeros(16000, np.float32), tone, np.zeros(16000, np.float32)])
    assert speech_rms(padded) == pytest.approx(0.1 / np.sqrt(2), rel=0.01)  # the pauses do not dilute it
    noise = np.random.default_rng(0).standard_normal(len(x)).astype(np.float32)
    for snr in (0.0, 10.0, 20.0):
        y = mix_at_snr(x, noise, snr)
        added = y - x
        assert _db(speech_rms(x), float(np.sqrt(np.mean(added.astype(np.float64) ** 2)))) == pytest.approx(snr, abs=0.05)
    loud = mix_at_snr(np.clip(x * 30, -1, 1), noise, -5.0)
    assert np.abs(loud).max() <= 1.0 + 1e-6  # scaled down rather than clipped


def test_babble_is_several_voices_of_the_requested_split() -> None:
    test_babble = make_babble(n=2, seed=0, talkers=3, seconds=3.0)
    train_babble = make_babble(n=2, seed=0, talkers=3, seconds=3.0, split="train")
    for b in test_babble + train_babble:
        assert len(b) == 24000 and np.isfinite(b).all()
        assert float(np.sqrt(np.mean(b.astype(np.float64) ** 2))) == pytest.approx(1.0, rel=1e-3)
    assert not np.allclose(test_babble[0], train_babble[0])  # held-out talkers differ from training ones


def test_robustness_set_has_one_subdirectory_per_noise_and_level(tmp_path: Path, speech: np.ndarray) -> None:
    src = _dataset(tmp_path, speech)
    info = noisy_dir(src, tmp_path / "out", [10, 0], kinds=["pink", "babble"], seed=1)
    assert info["sets"] == ["pink_10db", "pink_0db", "babble_10db", "babble_0db"] and info["clips"] == 8
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [r["noise"] for r in rows[:2]] == ["pink 10 dB", "pink 10 dB"] and rows[-1]["noise"] == "babble 0 dB"
    assert rows[0]["slots"] == {"account_number": "4421"} and rows[1]["intent"] == "goodbye"  # labels kept
    clean = sf.read(src / "acct.wav", dtype="float32")[0]
    at10 = sf.read(tmp_path / "out" / "pink_10db" / "acct.wav", dtype="float32")[0]
    at0 = sf.read(tmp_path / "out" / "pink_0db" / "acct.wav", dtype="float32")[0]
    assert len(at10) == len(clean)
    assert _db(speech_rms(clean), float(np.std(at10 - clean))) == pytest.approx(10, abs=0.3)
    assert np.std(at0 - clean) > 2.5 * np.std(at10 - clean)
    sub = [json.loads(line) for line in (tmp_path / "out" / "babble_0db" / "manifest.jsonl").read_text().splitlines()]
    assert [r["audio"] for r in sub] == ["acct.wav", "bye.wav"]  # each part stands alone
    noisy_dir(src, tmp_path / "again", [10, 0], kinds=["pink", "babble"], seed=1)
    for tag in info["sets"]:
        assert np.array_equal(sf.read(tmp_path / "out" / tag / "acct.wav")[0], sf.read(tmp_path / "again" / tag / "acct.wav")[0])


def test_training_augmentation_noises_a_share_of_clips_and_copies_the_rest(tmp_path: Path, speech: np.ndarray) -> None:
    src = write_clip_set(tmp_path / "src", [speech[: 8000 + 400 * k] for k in range(12)],
                         {"intent": "goodbye", "slots": {}, "text": "bye"})
    a = augment_dir(src, tmp_path / "a", share=0.5, snr_range=(0, 20), seed=3)
    b = augment_dir(src, tmp_path / "b", share=0.5, snr_range=(0, 20), seed=3)
    assert a["noisy"] == b["noisy"] and 0 < a["noisy"] < 12
    for r in derived_rows(src, tmp_path / "a", "noise"):
        if "noise" in r:
            kind, snr, unit = r["noise"].split()
            assert kind in ("babble", "white", "pink", "brown") and 0 <= float(snr) <= 20 and unit == "dB"
    assert augment_dir(src, tmp_path / "none", share=0.0)["noisy"] == 0


def test_bad_requests_are_clear_errors(tmp_path: Path, speech: np.ndarray, capsys: pytest.CaptureFixture[str]) -> None:
    src = _dataset(tmp_path, speech)
    with pytest.raises(NoiseError, match="must differ"):
        noisy_dir(src, src, [10])
    with pytest.raises(NoiseError, match="unknown noise"):
        noisy_dir(src, tmp_path / "x", [10], kinds=["traffic"])
    with pytest.raises(NoiseError, match="outside"):
        noisy_dir(src, tmp_path / "x", [99])
    with pytest.raises(NoiseError, match="share"):
        augment_dir(src, tmp_path / "x", share=1.5)
    assert not (tmp_path / "x").exists()  # checked before anything was written
    wide = tmp_path / "wide"
    wide.mkdir()
    sf.write(wide / "w.wav", np.zeros(1600, np.int16), 16000, subtype="PCM_16")
    (wide / "manifest.jsonl").write_text(json.dumps({"audio": "w.wav", "intent": "goodbye"}) + "\n")
    with pytest.raises(NoiseError, match="expected 8 kHz mono"):
        noisy_dir(wide, tmp_path / "w2", [10], kinds=["pink"])
    assert main(["engine", "add-noise", str(src), str(tmp_path / "o1")]) == 2
    assert "give --snr" in capsys.readouterr().err
    assert main(["engine", "add-noise", str(src), str(tmp_path / "o2"), "--train-share", "0.5", "--snr", "5"]) == 2
    assert "leave out --snr" in capsys.readouterr().err


def test_eval_reads_the_robustness_curve_off_one_pooled_set(tmp_path: Path, speech: np.ndarray) -> None:
    src = _dataset(tmp_path, speech)
    assert main(["engine", "add-noise", str(src), str(tmp_path / "curve"), "--snr", "20", "--snr", "5",
                 "--noise", "pink"]) == 0
    res = evaluate(tmp_path / "curve", progress=False)
    noise = res["breakdown"]["noise"]
    assert list(noise) == ["pink 5 dB", "pink 20 dB"]  # levels sort as numbers
    assert all(v["n"] == 2 and v["slot_n"] == 1 and 0.0 <= v["slot_accuracy"] <= 1.0 for v in noise.values())
