"""Hypothesis strategies for what a caller (and the engine) can throw at decide(): any intent (also one
the catalog lacks, or none) at any confidence, a runner-up, slot values, frustration, unusable audio."""

from __future__ import annotations

from typing import Any, Sequence

from hypothesis import strategies as st

from engine.types import Understanding
from policies.decide import DtmfDigit, NoInput

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
