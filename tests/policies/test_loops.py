"""No dialog loops: whatever the caller (or the engine) does, the call reaches an answer, a transfer
or a hang-up within K inputs, and a caller who keeps failing is always transferred or let go."""

from __future__ import annotations

import datetime as dt
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.types import Understanding
from policies.decide import REASONS, CallStart, CallState, DtmfDigit, NoInput, step
from policies.schema import load_policy
from tests.helpers.dialogue_inputs import caller_inputs, sure_turns

POLICY = load_policy()
K = POLICY.escalation.max_failures.max_stalled_turns  # the bound the loop guard promises
INTENTS = [*POLICY.intents, "not_in_catalog", None]
# 2026-11-23 is a Monday: New York 22:00 the day before, 08:00, 10:00 (every queue open), 17:00 and 22:00
# (general closed: callback offered), 08:30
TIMES = [dt.datetime(2026, 11, 23, h, m, tzinfo=dt.timezone.utc) for h, m in ((3, 0), (13, 0), (13, 30), (15, 0),
                                                                                (22, 0))] + \
    [dt.datetime(2026, 11, 24, 3, 0, tzinfo=dt.timezone.utc)]
IDENTIFIER = re.compile(r"\b[a-z]+_[a-z_]+\b")  # an intent or prompt name read to the caller

# uniform confidences, and a caller heard well (read-backs, changes of mind, "no" back to the question)
inputs = st.one_of(caller_inputs(INTENTS), sure_turns(list(POLICY.intents)))


@settings(max_examples=300, deadline=None)
@given(seq=st.lists(inputs, min_size=1, max_size=60), now=st.sampled_from(TIMES))
def test_any_sequence_reaches_an_outcome_within_k_inputs(seq: list, now: dt.datetime) -> None:
    """...and every prompt on the way is words: rendered, no identifier, no "None"."""
    d, state = step(POLICY, CallState(now=now), CallStart())
    since_outcome = 0
    for inp in seq:
        d, state = step(POLICY, state, inp)
        assert d.reason in REASONS, d
        assert d.prompt, f"silence after {inp!r}"
        assert "{" not in d.prompt and "}" not in d.prompt, d.prompt
        assert not IDENTIFIER.search(d.prompt), f"an identifier read to the caller: {d.prompt!r}"
        assert "None" not in d.prompt, d.prompt
        if d.action == "clarify":
            assert len(d.options) == 2 and all(o in POLICY.intents for o in d.options)
        if d.action in ("answer", "transfer", "hangup") and d.reason != "repeat":
            since_outcome = 0
        else:
            since_outcome += 1
            assert since_outcome < K, f"{K} inputs without an outcome: {state}"
        if state.ended:
            assert d.action in ("transfer", "hangup")
            break


@settings(max_examples=200, deadline=None)
@given(seq=st.lists(st.one_of(
    st.builds(lambda c: Understanding("deny", c), st.floats(0.5, 1.0)),
    st.builds(lambda i, c: Understanding(i, c, [(i, c)]), st.sampled_from(["pay_bill", "report_outage", "check_balance"]),
              st.floats(0.5, 0.84)),
    st.builds(lambda c: Understanding(None, c), st.floats(0.0, 0.49)),
    st.just(NoInput()),
    st.sampled_from([DtmfDigit("9"), DtmfDigit("*")]),
), min_size=40, max_size=40), now=st.sampled_from(TIMES))
def test_a_caller_who_never_gets_through_is_escalated(seq: list, now: dt.datetime) -> None:
    """Only "no", mid-confidence intents, mumbles, silence and wrong keys: the call must end, at most K
    inputs after its last outcome (restating an intent under confirmation answers it: an outcome)."""
    _, state = step(POLICY, CallState(now=now), CallStart())
    since_outcome = 0
    for inp in seq:
        d, state = step(POLICY, state, inp)
        since_outcome = 0 if d.action == "answer" and d.reason != "repeat" else since_outcome + 1
        if state.ended:
            assert d.action in ("transfer", "hangup") and d.prompt
            break
    assert since_outcome <= K, f"{since_outcome} inputs since the last outcome: {state}"
    assert state.ended or since_outcome < K


def test_an_either_or_answered_unclearly_again_and_again_reaches_a_person() -> None:
    """Found by the property test in test_qa2_resume: "balance or bill?" asked five times in a row, because
    an answer that was itself a close call between two requests never counted as a failed turn."""
    def close(a: str, b: str) -> Understanding:
        return Understanding(a, 0.5, [(a, 0.5), (b, 0.45)])

    now = dt.datetime(2026, 11, 23, 15, 0, tzinfo=dt.timezone.utc)
    _, state = step(POLICY, CallState(now=now), CallStart())
    seq = [close("check_balance", "pay_bill"), NoInput(), close("check_balance", "pay_bill"),
           close("check_balance", "report_outage"), close("check_balance", "pay_bill"),
           close("pay_bill", "check_balance")]
    clarifies = 0
    for inp in seq:
        d, state = step(POLICY, state, inp)
        if d.action != "clarify":
            break
        clarifies += 1
    assert (d.action, d.reason) == ("transfer", "max_failures")
    assert clarifies == POLICY.escalation.max_failures.count  # the first question, then a failed turn each
