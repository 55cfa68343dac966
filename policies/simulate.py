"""Scripted multi-turn dialogues through decide(): `bot policy simulate SCRIPT`.

Script (YAML):

    now: 2026-11-23T15:00:00Z        # optional: the time used for business hours (default: now)
    dialogues:                       # or a single dialogue's `turns:` at the top level
      - name: pay with confirmation
        turns:
          - say: I'd like to pay forty dollars            # shown in the trace
            understanding: {intent: pay_bill, confidence: 0.7, slots: {amount: 40}}
          - understanding: {intent: affirm, confidence: 0.95}
          - wav: audio/balance.wav                        # run through the engine (path relative to SCRIPT)
          - event: no_input          # no_input | engine_failure | redis_failure
          - dtmf: "1"
        expect: [confirm, answer/confirmed]   # optional: actions (or action/reason) expected after the greeting

Each dialogue starts with the greeting (CallStart). A mismatch against `expect` fails the run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from engine.textnorm import DAYS
from engine.types import Understanding
from policies.decide import CallStart, CallState, DtmfDigit, EngineFailure, Input, NoInput, RedisFailure, step
from policies.replay import ReplayError, read_wav, understanding_from_dict
from policies.schema import Policy

EVENTS: dict[str, Callable[[], Input]] = {
    "no_input": NoInput, "engine_failure": EngineFailure, "redis_failure": RedisFailure, "call_start": CallStart,
}


class ScriptError(ValueError):
    """A malformed simulation script."""


@dataclass
class TraceStep:
    turn: int
    input: str
    action: str
    reason: str
    prompt: str
    target: str | None = None
    intent: str | None = None
    slots: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        extra = f" -> {self.target}" if self.target else ""
        who = f" [{self.intent}{' ' + str(self.slots) if self.slots else ''}]" if self.intent else ""
        return f"{self.turn:>3}  {self.input:<44.44}  {self.action}/{self.reason}{who}{extra}\n       bot: {self.prompt}"


@dataclass
class DialogueResult:
    name: str
    steps: list[TraceStep]
    expected: list[str] | None
    ok: bool


def _parse_now(v: Any) -> dt.datetime:
    if v is None:
        return dt.datetime.now(dt.timezone.utc)
    if isinstance(v, dt.datetime):
        return v if v.tzinfo else v.replace(tzinfo=dt.timezone.utc)
    try:
        t = dt.datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    except ValueError as exc:
        raise ScriptError(f"now: {exc}") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def load_script(path: str | Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ScriptError(f"cannot read script: {exc}") from None
    except yaml.YAMLError as exc:
        raise ScriptError(f"invalid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ScriptError("a script is a mapping with `dialogues:` or `turns:`")
    if "dialogues" not in doc:
        doc = {"now": doc.get("now"), "dialogues": [{"name": doc.get("name", Path(path).stem), **doc}]}
    if not isinstance(doc["dialogues"], list) or not doc["dialogues"]:
        raise ScriptError("`dialogues` must be a non-empty list")
    return doc


class _Inputs:
    """Turns a script turn into a decide() input; WAV turns load the engine once, on first use."""

    def __init__(self, base: Path, model_loader: Callable[[], Any]) -> None:
        self.base = base
        self._loader = model_loader
        self._model: Any = None

    def __call__(self, turn: Any, where: str) -> tuple[Input, str]:
        if not isinstance(turn, dict):
            raise ScriptError(f"{where}: a turn is a mapping (understanding | wav | event | dtmf)")
        if "understanding" in turn:
            if not isinstance(turn["understanding"], dict):
                raise ScriptError(f"{where}: understanding must be a mapping ({{intent: pay_bill, confidence: 0.9}}), "
                                  f"got {turn['understanding']!r}"[:200])
            try:
                u = understanding_from_dict({"alternatives": None, **turn["understanding"]})
            except (ReplayError, TypeError, ValueError) as exc:
                raise ScriptError(f"{where}: {exc}") from None
            for name, conf in [("confidence", u.confidence), *(("alternatives", c) for _, c in u.alternatives)]:
                if not 0.0 <= conf <= 1.0:  # NaN fails too; decide() would silently treat it as a number
                    raise ScriptError(f"{where}: understanding.{name} must be a probability in [0, 1], got {conf}")
            if not u.alternatives:  # default: the top intent alone
                u = dataclasses.replace(u, alternatives=[(u.intent, u.confidence)])
            label = turn.get("say") or u.transcript or f"<{u.intent} {u.confidence:.2f}>"
            return u, f'"{label}"'
        if "wav" in turn:
            path = (self.base / str(turn["wav"])).resolve()
            try:
                pcm = read_wav(path)
            except ReplayError as exc:
                raise ScriptError(f"{where}: {exc}") from None
            if self._model is None:
                self._model = self._loader()
            u = self._model.understand_batch([pcm])[0]
            return u, f"{Path(str(turn['wav'])).name}: \"{u.transcript}\" -> {u.intent} {u.confidence:.2f}"
        if "event" in turn:
            make = EVENTS.get(str(turn["event"]))
            if make is None:
                raise ScriptError(f"{where}: unknown event {turn['event']!r} (one of {sorted(EVENTS)})")
            return make(), f"<{turn['event']}>"
        if "dtmf" in turn:
            digits = str(turn["dtmf"])
            if not digits or any(c not in "0123456789*#" for c in digits):
                raise ScriptError(f"{where}: dtmf must be keypad keys, got {digits!r}")
            return DtmfDigit(digits), f"<keys {digits}>"
        raise ScriptError(f"{where}: a turn needs one of understanding, wav, event, dtmf")


_DAY_WORDS = frozenset(DAYS)  # the day values the engine gives


def _check_slots(policy: Policy, slots: dict[str, Any], where: str) -> None:
    """Slot values as the engine gives them (a positive amount, a weekday/today/tomorrow, a digit string): a
    hand-written `{amount: forty}` would otherwise be read back as "a payment of forty dollars" and "paid"."""
    for name, value in slots.items():
        spec = policy.slots.get(name)
        if spec is None:
            raise ScriptError(f"{where}: unknown slot {name!r} (the policy's slots: {sorted(policy.slots)})")
        ok = {
            "money": lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                and 0 < v < 10_000_000),
            "day": lambda v: isinstance(v, str) and v.lower() in _DAY_WORDS,
            "digits": lambda v: isinstance(v, str) and v.isdigit(),
        }[spec.type](value)
        if not ok:
            want = {"money": "a positive number (40 or 12.5)", "day": "a weekday, today or tomorrow",
                    "digits": 'a string of digits in quotes ("1234")'}[spec.type]
            raise ScriptError(f"{where}: slot {name!r} ({spec.type}) must be {want}, got {value!r}"[:200])


def _matches(steps: list[TraceStep], expected: list[str]) -> bool:
    """`expect` entries are actions ("confirm") or action/reason pairs ("confirm/confirm_requested")."""
    if len(steps) != len(expected):
        return False
    return all(e == (f"{s.action}/{s.reason}" if "/" in e else s.action) for s, e in zip(steps, expected))


def simulate(policy: Policy, script: dict[str, Any], base: Path, model_loader: Callable[[], Any]) -> list[DialogueResult]:
    now = _parse_now(script.get("now"))
    to_input = _Inputs(base, model_loader)
    results = []
    for i, dlg in enumerate(script["dialogues"]):
        if not isinstance(dlg, dict) or not isinstance(dlg.get("turns"), list):
            raise ScriptError(f"dialogues[{i}]: needs a `turns:` list")
        name = str(dlg.get("name", f"dialogue {i + 1}"))
        state = CallState(now=_parse_now(dlg["now"]) if "now" in dlg else now)
        d, state = step(policy, state, CallStart())
        steps = [TraceStep(0, "<call start>", d.action, d.reason, d.prompt)]
        for n, turn in enumerate(dlg["turns"], 1):
            if state.ended:
                break
            where = f"dialogues[{i}].turns[{n - 1}]"
            inp, label = to_input(turn, where)
            if isinstance(inp, Understanding):
                _check_slots(policy, inp.slots, where)
            d, state = step(policy, state, inp)
            steps.append(TraceStep(n, label, d.action, d.reason, d.prompt, d.target, d.intent, dict(d.slots)))
        expected = dlg.get("expect")
        if expected is not None and not isinstance(expected, list):
            raise ScriptError(f"dialogues[{i}].expect: a list of actions")
        ok = expected is None or _matches(steps[1:], [str(e) for e in expected])
        results.append(DialogueResult(name, steps, expected, ok))
    return results
