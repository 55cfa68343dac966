"""Paired bootstrap comparison of two models (engine/training/compare.py)."""

import json
from pathlib import Path

import numpy as np
import pytest

from engine.training.compare import paired_bootstrap
from engine.understanding import default_model_dir

ROOT = Path(__file__).resolve().parents[2]


def test_one_clip_difference_is_within_noise() -> None:
    a = np.array([1] * 131 + [0] * 51)
    b = a.copy()
    b[0] = 0  # 130 vs 131 of 182: the kind of gap a release rule must not read as a regression
    r = paired_bootstrap(a, b)
    assert r["n"] == 182 and r["changed"] == 1 and r["diff"] == pytest.approx(-1 / 182, abs=1e-4)
    assert r["ci95"][0] < 0 <= r["ci95"][1]


def test_a_real_gap_excludes_zero_and_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    a = (rng.random(500) < 0.7).astype(float)
    b = np.where(rng.random(500) < 0.3, 1.0, a)  # b fixes ~30 % of a's misses and breaks nothing
    r = paired_bootstrap(a, b)
    assert r["diff"] > 0 and r["ci95"][0] > 0
    assert paired_bootstrap(a, b) == r


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        paired_bootstrap(np.ones(3), np.ones(4))
    assert paired_bootstrap(np.array([]), np.array([]))["n"] == 0


def test_cli_same_model_has_no_difference(tmp_path: Path, capsys) -> None:
    """The packaged model against itself on a few synthesized clips: zero difference, zero-width interval."""
    import soundfile as sf

    from bot.cli import main
    from engine.training.channel import telephone
    from engine.training.tts import Voice, synthesize

    rng = np.random.default_rng(0)
    rows = [("I want to pay my bill", "pay_bill", {}), ("agent please", "speak_to_agent", {}),
            ("four two seven one", None, {"account_number": "4271"})]
    with open(tmp_path / "manifest.jsonl", "w") as fh:
        for i, (text, intent, slots) in enumerate(rows):
            pcm = telephone(synthesize(Voice("espeak", "en-us+m3"), text), rng)
            sf.write(str(tmp_path / f"c{i}.wav"), pcm, 8000, subtype="PCM_16")
            fh.write(json.dumps({"audio": f"c{i}.wav", "intent": intent, "slots": slots, "text": text}) + "\n")
    model = str(default_model_dir())
    assert main(["engine", "compare", str(tmp_path), "--b", model, "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["intent_accuracy"]["n"] == 3 and res["intent_accuracy"]["diff"] == 0.0
    assert res["intent_accuracy"]["ci95"] == [0.0, 0.0] and res["slot_accuracy"]["n"] == 1
    assert main(["engine", "compare", str(tmp_path / "nowhere"), "--b", model]) == 2
    assert "manifest.jsonl" in capsys.readouterr().err
    # a hand-written "4-2-7-1" is the same gold value as "4271" (labels read as `bot engine eval` reads them)
    text = (tmp_path / "manifest.jsonl").read_text().replace('"4271"', '"4-2-7-1"')
    (tmp_path / "manifest.jsonl").write_text(text)
    assert main(["engine", "compare", str(tmp_path), "--b", model, "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["slot_accuracy"]["a"] == res["slot_accuracy"]["a"]
