"""Hypothesis strategies for what a caller (and the engine) can throw at decide(): any intent (also one
the catalog lacks, or none) at any confidence, a runner-up, slot values, frustration, unusable audio; and
`play`, which runs a scripted call through decide() turn by turn."""

from __future__ import annotations

import datetime as dt
from typing import Any, Sequence

from hypothesis import strategies as st

from engine.types import Understanding
from policies.decide import CallStart, CallState, DtmfDigit, Input, NoInput, step
from policies.decision import Decision
from policies.schema import Policy

# menu keys, and numbers typed as a value (an amount: "50#", "50*25#")
KEYS = [*"0123456789*#", "12#", "50#", "50*25#"]
SLOT_SETS = [{}, {"amount": 40.0}, {"amount": 12.5}, {"day": "friday"}, {"day": "tomorrow"},
             {"account_number": "1234"}, {"amount": 40.0, "day": "monday"}]


@st.composite
def understandings(draw: st.DrawFn, intents: Sequence[str | None]) -> Understanding:
    top = draw(st.sampled_from(intents))
    conf = draw(st.floats(0.0, 1.0))
    second = draw(st.sampled_from(intents))
    p2 = draw(st.floats(0.0, 1.0 - conf))
    slots = draw(st.sampled_from(SLOT_SETS))
    frustration = draw(st.sampled_from([0.0, 0.3, 0.95]))
    error = draw(st.sampled_from([None, None, None, "too_short"]))
    return Understanding(top, conf, [(top, conf), (second, p2)], slots=dict(slots),
                         caller_state={"frustration": frustration}, error=error)


def caller_inputs(intents: Sequence[str | None]) -> st.SearchStrategy[Any]:
    """One caller turn: words (as the engine understood them), silence, or keys."""
    return st.one_of(understandings(intents), st.just(NoInput()), st.sampled_from([DtmfDigit(k) for k in KEYS]))



def sure_turns(intents: Sequence[str]) -> st.SearchStrategy[Any]:
    """Turns of a caller who is mostly heard well: confident yes/no (also with a value: "no, sixty"), a request
    heard in its confirm band or above (a change of mind), two requests heard close, a bare value, "say that
    again", keys, silence. Confidences are picked from the bands that matter (under confirm, in the band, between
    accept and a stricter override, above all), so the read-back, change-of-mind and resume paths are reached far
    more often than with uniform confidences. Several request draws weight the mix toward requests."""
    bands = [0.3, 0.5, 0.85, 0.92, 0.98]
    yes_no = st.builds(lambda i, c, s: Understanding(i, c, [(i, c)], slots=dict(s)),
                       st.sampled_from(["affirm", "deny"]), st.sampled_from([0.5, 0.85, 0.95]),
                       st.sampled_from(SLOT_SETS))
    request = st.builds(lambda i, c, s: Understanding(i, c, [(i, c)], slots=dict(s)),
                        st.sampled_from(list(intents)), st.sampled_from(bands), st.sampled_from(SLOT_SETS))
    close = st.builds(lambda a, b: Understanding(a, 0.5, [(a, 0.5), (b, 0.45)]),
                      st.sampled_from(list(intents)), st.sampled_from(list(intents)))
    value = st.builds(lambda s: Understanding(None, 0.9, [(None, 0.9)], slots=dict(s)), st.sampled_from(SLOT_SETS[1:]))
    return st.one_of(request, yes_no, request, yes_no, value, close,
                     st.just(Understanding("repeat", 0.95, [("repeat", 0.95)])),
                     st.just(NoInput()), st.sampled_from([DtmfDigit(k) for k in KEYS]))


def play(policy: Policy, inputs: list[Input], now: dt.datetime) -> tuple[list[Decision], CallState]:
    """A call from its start through `inputs` (stopping where the call ends): every decision, and the last state."""
    state = CallState(now=now)
    out = []
    for inp in [CallStart(), *inputs]:
        if state.ended:
            break
        d, state = step(policy, state, inp)
        out.append(d)
    return out, state
