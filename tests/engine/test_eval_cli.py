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
    from engine.graphs import select_graph

    assert (res["model"], res["graph"]) == (default_model_dir().name, select_graph(default_model_dir()).name)
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
    imported = (run / "calibration.json").read_text()  # the release's own calibration, untouched by the refusal
    assert json.loads(imported)["split"].startswith("imported from")
    assert main(args + ["--min-clips", "8"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["split"] == "my_calls" and res["n"] == 8 and 0.05 <= res["temperature"] <= 20
    # "before" is the release's temperature, the one that would ship without this fit
    assert abs(res["temperature_before"] - json.loads(imported)["temperature"]) < 1e-9
    assert (run / "calibration.prev.json").read_text() == imported
    assert 0.0 <= res["ece_after"] <= 1.0 and 0.0 <= res["accuracy"] <= 1.0
    from engine.training.calibrate import BLANK_PENALTY_GRID

    assert res["slot_blank_penalty"] in BLANK_PENALTY_GRID and len(res["slot_penalty_table"]) == len(BLANK_PENALTY_GRID)
    assert (tmp_path / "cache" / "my_calls" / "index.json").exists()
    assert json.loads((run / "calibration.json").read_text()) == res


def _clip(path, text: str, rate: int = 8000, channels: int = 1, seed: int = 0) -> None:
    from engine.features import resample

    pcm = telephone(synthesize(Voice("flite", "slt"), text), np.random.default_rng(seed)).astype(np.float32) / 32768
    if rate != 8000:
        pcm = resample(pcm, 8000, rate)
    sf.write(str(path), np.stack([pcm] * channels, 1) if channels > 1 else pcm, rate, subtype="PCM_16")


def test_eval_lists_every_bad_manifest_row_with_its_line_before_running(tmp_path, capsys) -> None:
    """A customer's hand-written manifest (Windows editor: BOM, CRLF): every problem named by line and field,
    in one pass, and nothing scored (a partly scored set would report figures for another set)."""
    _clip(tmp_path / "ok.wav", "what is my balance")
    (tmp_path / "junk.wav").write_bytes(b"RIFF nonsense")
    rows = [
        '{"audio": "ok.wav", "intent": "check_balance", "slots": {}, "text": "what is my balance"}',
        '{"audio": "gone.wav", "intent": "pay_bill"}',
        '{"audio": "ok.wav", "intent": "internet_down"}',
        '{"audio": "ok.wav", "intent": null, "slots": {"amount": "about fifty", "zip": 1}}',
        '{"audio": "ok.wav" "intent": null}',
        '{"audio": "junk.wav", "intent": "goodbye"}',
        '{"audio": "ok.wav"}',
    ]
    (tmp_path / "manifest.jsonl").write_bytes(("\r\n".join(rows) + "\r\n").encode("utf-8-sig"))
    assert main(["engine", "eval", str(tmp_path), "--json", "--report-dir", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    for needle in ("manifest.jsonl:2: audio: file not found", "manifest.jsonl:3: intent: 'internet_down'",
                   "manifest.jsonl:4: slots.amount: 'about fifty'", "manifest.jsonl:4: slots.zip",
                   "manifest.jsonl:5: line: not JSON", "manifest.jsonl:6: audio: cannot read",
                   "manifest.jsonl:7: intent: missing", "7 problem(s)"):
        assert needle in err, err
    assert "manifest.jsonl:1:" not in err  # the BOM is not part of the first row
    assert not (tmp_path / "rep").exists()


def test_gold_slot_values_written_by_hand_are_normalised() -> None:
    from engine.training.evaluate import normalise_slot_value

    assert normalise_slot_value("money", "$552.00") == 552.0 and normalise_slot_value("money", "1,200 dollars") == 1200.0
    assert normalise_slot_value("money", 40) == 40.0 and normalise_slot_value("day", " Tuesday") == "tuesday"
    assert normalise_slot_value("digits", "40-21 3") == "40213" and normalise_slot_value("digits", 1234) == "1234"
    for kind, bad in (("money", "about fifty"), ("day", "next week"), ("digits", "12a4"), ("money", True)):
        with pytest.raises(ValueError):
            normalise_slot_value(kind, bad)


def test_calibrate_on_a_recordings_folder_path_caches_outside_it(tmp_path, capsys) -> None:
    """`calibrate --split /path/to/calls`: cached under --cache (the recordings folder is only read), 16 kHz and
    stereo clips read at 8 kHz as eval reads them, a manifest changed since caching is refused, and the run's
    previous calibration kept."""
    pytest.importorskip("torch")
    from engine.training.cache import cache_split
    from engine.training.evaluate import load_wav
    from engine.training.import_onnx import import_model

    run = tmp_path / "run"
    import_model(default_model_dir(), run)
    calls = tmp_path / "calls"
    calls.mkdir()
    with open(calls / "manifest.jsonl", "w") as f:
        for i, (text, intent, slots) in enumerate(ROWS):
            rate, ch = [(8000, 1), (16000, 1), (44100, 2), (8000, 1)][i]
            _clip(calls / f"c{i}.wav", text, rate, ch, seed=i)
            row = {"audio": str(calls / f"c{i}.wav") if i == 1 else f"c{i}.wav", "intent": intent, "slots": slots}
            if i != 3:
                row["text"] = text  # text is optional
            f.write(json.dumps(row) + "\n")
    before = sorted(p.name for p in calls.iterdir())
    (run / "calibration.json").write_text('{"temperature": 1.5}')
    args = ["engine", "calibrate", "--run", str(run), "--cache", str(tmp_path / "cache"), "--split", str(calls),
            "--workers", "1"]
    assert main(args) == 2 and "at least 200" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # refused before encoding anything
    assert main(args + ["--min-clips", "4"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 4 and res["accuracy"] >= 0.5
    assert sorted(p.name for p in calls.iterdir()) == before
    (cached,) = (tmp_path / "cache").iterdir()
    index = json.loads((cached / "index.json").read_text())
    lengths = {int(s): idx for s, idx in index["buckets"].items()}
    for i in range(4):  # the bucket is the clip's length at 8 kHz, not at its own rate
        s = next(s for s, idx in lengths.items() if i in idx)
        assert s == max(1, int(np.ceil(len(load_wav(calls / f"c{i}.wav")) / 8000 - 1e-9)))
    assert json.loads((run / "calibration.prev.json").read_text()) == {"temperature": 1.5}
    with open(calls / "manifest.jsonl", "a") as f:
        f.write(json.dumps({"audio": "c0.wav", "intent": "goodbye"}) + "\n")
    with pytest.raises(SystemExit, match="another version"):
        cache_split(calls, cached, workers=1)


def test_latency_and_eval_eot_refuse_bad_arguments_with_a_message(tmp_path, capsys) -> None:
    """Operator mistakes give one `error:` line and exit 2 (they used to end in tracebacks)."""
    assert main(["engine", "latency", "-n", "0"]) == 2
    assert main(["engine", "latency", "--seconds", "0.1", "-n", "2"]) == 2  # shorter than the model takes
    assert main(["engine", "latency", "--model", str(tmp_path), "-n", "2"]) == 2
    assert "cannot load the understanding model: no understanding model in" in capsys.readouterr().err
    assert main(["engine", "eval-eot", str(tmp_path / "nope")]) == 2
    assert "manifest.jsonl" in capsys.readouterr().err
    sf.write(str(tmp_path / "a.wav"), np.zeros(8000, dtype=np.int16), 8000, subtype="PCM_16")
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"audio": "a.wav", "intent": None}) + "\n")
    assert main(["engine", "eval-eot", str(tmp_path)]) == 2  # no row carries an "eot" label
    assert 'no manifest row has an "eot" label' in capsys.readouterr().err
    assert main(["engine", "eval-eot", str(tmp_path), "--limit", "0"]) == 2


def test_latency_reports_percentiles(capsys) -> None:
    assert main(["engine", "latency", "--seconds", "1", "-n", "3"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["n"] == 3 and 0 < res["latency_ms"]["p50"] <= res["latency_ms"]["p95"]
