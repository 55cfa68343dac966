"""`bot policy simulate` scripts (and `bot policy tune --outputs` lines) written by hand: a malformed
understanding is a clear error naming the turn and the field, never a Python traceback; and the dialogues
that used to go wrong read as a caller would want them to in the trace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from policies.replay import ReplayError, read_outputs
from policies.schema import load_policy
from policies.simulate import ScriptError, load_script, simulate

POLICY = load_policy()


def _no_model() -> Any:
    raise AssertionError("no WAV turns here")


def _simulate(tmp_path: Path, text: str) -> list:
    path = tmp_path / "script.yaml"
    path.write_text(text)
    return simulate(POLICY, load_script(path), tmp_path, _no_model)


@pytest.mark.parametrize("understanding,field", [
    ("{intent: pay_bill, confidence: 0.9, alternatives: [[pay_bill]]}", "alternatives[0]"),
    ("{intent: pay_bill, confidence: 0.9, alternatives: [pay_bill]}", "alternatives[0]"),
    ("{intent: pay_bill, confidence: 0.9, alternatives: pay_bill}", "alternatives"),
    ("{intent: pay_bill, confidence: 0.9, alternatives: [[[pay_bill], 0.9]]}", "alternatives[0] intent"),
    ("{intent: [pay_bill], confidence: 0.9}", "intent"),
    ("{intent: pay_bill, confidence: high}", "confidence"),
    ("{intent: pay_bill, confidence: 0.9, caller_state: [1]}", "caller_state"),
    ("{intent: pay_bill, confidence: 0.9, caller_state: {frustration: very}}", "caller_state.frustration"),
    ("{intent: pay_bill, confidence: 0.9, slots: [40]}", "slots"),
])
def test_a_malformed_understanding_is_a_script_error(tmp_path: Path, understanding: str, field: str) -> None:
    with pytest.raises(ScriptError) as err:
        _simulate(tmp_path, f"turns:\n  - understanding: {understanding}\n")
    assert "turns[0]" in str(err.value) and field in str(err.value), str(err.value)


def test_a_damaged_outputs_line_names_its_line(tmp_path: Path) -> None:
    good = {"audio": "a.wav", "gold": "pay_bill", "understanding": {"intent": "pay_bill", "confidence": 0.9,
                                                                    "alternatives": [["pay_bill", 0.9]]}}
    bad = {**good, "understanding": {**good["understanding"], "alternatives": [["pay_bill"]]}}
    path = tmp_path / "outputs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ReplayError, match=r"outputs.jsonl:2: .*alternatives\[0\]"):
        read_outputs(path)
    path.write_text(json.dumps(good) + "\n")
    assert read_outputs(path)[0].understanding.alternatives == [("pay_bill", 0.9)]


def test_the_trace_of_a_served_caller_saying_no_thanks(tmp_path: Path) -> None:
    results = _simulate(tmp_path, """
now: 2026-11-23T15:00:00Z
dialogues:
  - name: balance, then no thanks
    turns:
      - say: how much do I owe
        understanding: {intent: check_balance, confidence: 0.97}
      - say: no thanks
        understanding: {intent: deny, confidence: 0.93}
    expect: [answer/accepted, hangup/goodbye]
""")
    assert results[0].ok, [s.line() for s in results[0].steps]
    assert results[0].steps[-1].prompt == POLICY.prompts["goodbye"]
