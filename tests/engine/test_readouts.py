"""`bot engine readouts`: long read-outs by one split's voices, where long-turn choices are made."""

import json
from pathlib import Path

import soundfile as sf

from engine.training.readouts import make_readout_eval
from engine.training.synth import split_of_voice
from engine.training.tts import Voice


def test_readouts_are_long_deterministic_and_use_only_the_split_voices(tmp_path: Path) -> None:
    a = make_readout_eval(tmp_path / "a", "account_number", split="val", n=3, seed=7)
    b = make_readout_eval(tmp_path / "b", "account_number", split="val", n=3, seed=7)
    rows = [json.loads(line) for line in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()]
    assert a["n"] == 3 and len(rows) == 3
    assert rows == [json.loads(line) for line in (tmp_path / "b" / "manifest.jsonl").read_text().splitlines()]
    for r in rows:
        digits = r["slots"]["account_number"]
        assert r["intent"] is None and 9 <= len(digits) <= 14 and digits.isdigit()
        assert split_of_voice(Voice(*r["voice"].split(":", 1))) == "val"
        info = sf.info(str(tmp_path / "a" / r["audio"]))
        assert info.samplerate == 8000 and info.duration > 5.0
    assert b["seconds_max"] == a["seconds_max"]
