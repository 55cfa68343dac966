"""`bot engine eval DIR --json` contract on a small freshly generated eval dir."""

import json

import numpy as np
import pytest
import soundfile as sf

from bot.cli import main
from engine.training.channel import telephone
from engine.training.tts import Voice, synthesize
from engine.understanding import default_model_dir

pytestmark = pytest.mark.skipif(not (default_model_dir() / "model.onnx").exists(), reason="no shipped model")

ROWS = [
    ("I want to cancel my service", "cancel_service", {}),
    ("what is my balance", "check_balance", {}),
    ("tuesday please", None, {"day": "tuesday"}),
    ("no thanks", "deny", {}),
]


def test_eval_json_contract(tmp_path, capsys) -> None:
    rng = np.random.default_rng(3)
    with open(tmp_path / "manifest.jsonl", "w") as f:
        for i, (text, intent, slots) in enumerate(ROWS):
            pcm = telephone(synthesize(Voice("flite", "slt"), text), rng)
            sf.write(str(tmp_path / f"u{i}.wav"), pcm, 8000, subtype="PCM_16")
            f.write(json.dumps({"audio": f"u{i}.wav", "intent": intent, "slots": slots, "text": text}) + "\n")
    assert main(["engine", "eval", str(tmp_path), "--json", "--report-dir", str(tmp_path / "rep")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("n", "intent_accuracy", "slot_accuracy", "wer", "ece", "latency_ms", "per_intent"):
        assert key in res
    assert res["n"] == 4 and 0.0 <= res["intent_accuracy"] <= 1.0 and 0.0 <= res["ece"] <= 1.0
    assert set(res["latency_ms"]) == {"p50", "p95"} and res["latency_ms"]["p95"] > 0
    assert set(res["per_intent"]) == {"cancel_service", "check_balance", "None", "deny"}
    assert (tmp_path / "rep" / f"REPORT_{tmp_path.name}.md").exists()
    assert (tmp_path / "rep" / f"reliability_{tmp_path.name}.png").exists()


def test_eval_missing_manifest_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["engine", "eval", str(tmp_path), "--json"]) == 2
    assert "manifest.jsonl" in capsys.readouterr().err


def test_calibrate_fits_the_temperature_on_a_labelled_folder_of_recordings(tmp_path, capsys) -> None:
    """`bot engine calibrate --split NAME --data DIR`: an operator's own labelled calls, cached on first use."""
    pytest.importorskip("torch")
    from engine.training.import_onnx import import_model

    run = tmp_path / "run"
    import_model(default_model_dir(), run)  # the shipped release as a trainable run
    calls = tmp_path / "data" / "my_calls"
    calls.mkdir(parents=True)
    rng = np.random.default_rng(5)
    with open(calls / "manifest.jsonl", "w") as f:
        for i, (text, intent, slots) in enumerate(ROWS * 2):
            pcm = telephone(synthesize(Voice("espeak", "en-029+f4"), text), rng)
            sf.write(str(calls / f"c{i}.wav"), pcm, 8000, subtype="PCM_16")
            f.write(json.dumps({"audio": f"c{i}.wav", "intent": intent, "slots": slots, "text": text}) + "\n")
    args = ["engine", "calibrate", "--run", str(run), "--cache", str(tmp_path / "cache"), "--split", "my_calls",
            "--data", str(tmp_path / "data"), "--workers", "1"]
    assert main(args) == 2  # 8 clips: too few to trust (the default floor is 200)
    assert "at least 200" in capsys.readouterr().err
    assert not (run / "calibration.json").exists()
    assert main(args + ["--min-clips", "8"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["split"] == "my_calls" and res["n"] == 8 and 0.05 <= res["temperature"] <= 20
    assert 0.0 <= res["ece_after"] <= 1.0 and 0.0 <= res["accuracy"] <= 1.0
    from engine.training.calibrate import BLANK_PENALTY_GRID

    assert res["slot_blank_penalty"] in BLANK_PENALTY_GRID and len(res["slot_penalty_table"]) == len(BLANK_PENALTY_GRID)
    assert (tmp_path / "cache" / "my_calls" / "index.json").exists()
    assert json.loads((run / "calibration.json").read_text()) == res
