"""The conversation's judgment as a caller hears it: multi-turn dialogues through step() on the default
policy where the pending question, the caller's state and the failure count interact. Each case is one
that used to go wrong: the reprompt the caller heard made no sense for what they had just said."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.types import Understanding
from policies.decide import CallState, DtmfDigit, Input, NoInput
from policies.decision import Decision
from policies.schema import Policy, load_policy, parse_policy
from tests.helpers.dialogue_inputs import caller_inputs, play
from tests.helpers.policy_text import DEFAULT_TEXT

POLICY = load_policy()
UTC = dt.timezone.utc
OPEN = dt.datetime(2026, 11, 23, 15, 0, tzinfo=UTC)  # Monday 10:00 New York: every queue open
NIGHT = dt.datetime(2026, 11, 24, 3, 0, tzinfo=UTC)  # Monday 22:00 New York: general closed, callback offered
K = POLICY.escalation.max_failures.max_stalled_turns
FRUSTRATED = {"frustration": 0.95}


def U(intent: str | None, conf: float, alts: list[tuple[str | None, float]] | None = None, **kw: Any) -> Understanding:
    return Understanding(intent=intent, confidence=conf, alternatives=alts or [(intent, conf)], **kw)


YES, NO = U("affirm", 0.95), U("deny", 0.95)
MUMBLE = U("pay_bill", 0.1, [("pay_bill", 0.1), ("check_balance", 0.05)])
AMBIGUOUS = U("pay_bill", 0.45, [("pay_bill", 0.45), ("check_balance", 0.4)])


def run(inputs: list[Input], now: dt.datetime = OPEN, policy: Policy = POLICY) -> tuple[list[Decision], CallState]:
    return play(policy, inputs, now)


def trace(decisions: list[Decision]) -> list[tuple[str, str]]:
    return [(d.action, d.reason) for d in decisions[1:]]


# -- "Anything else?" -> "No" -------------------------------------------------------------------------


@pytest.mark.parametrize("served", [
    [U("check_balance", 0.97)],
    [U("report_outage", 0.7), YES],
    [U("pay_bill", 0.95, slots={"amount": 40.0}), YES],
    [U("check_balance", 0.97), U("repeat", 0.9)],  # heard the answer again, then "no"
], ids=["answered", "confirmed", "paid", "repeated"])
def test_no_to_anything_else_says_goodbye(served: list[Input]) -> None:
    """Every answer ends in "Anything else?"; "no thanks" is the caller's goodbye. It used to get "What can
    I help you with today?" as a failed turn, and a caller who said it a few times went to an agent."""
    decisions, state = run([*served, U("deny", 0.9)])
    assert decisions[-2].prompt.endswith("?")
    d = decisions[-1]
    assert (d.action, d.reason) == ("hangup", "goodbye") and d.prompt == POLICY.prompts["goodbye"]
    assert state.ended


def test_no_with_nothing_asked_is_still_out_of_context() -> None:
    # after the greeting ("How can I help you today?") a bare "no" is no answer
    assert trace(run([NO])[0]) == [("reprompt", "no_context")]
    # "no, fifty dollars" after a payment is a correction attempt, not a goodbye: not hung up on
    d = run([U("pay_bill", 0.95, slots={"amount": 40.0}), YES, U("deny", 0.9, slots={"amount": 50.0})])[0][-1]
    assert d.action != "hangup"
    # an unsure "no" is not taken as a goodbye
    assert run([U("check_balance", 0.97), U("deny", 0.3)])[0][-1].action != "hangup"


def test_no_after_an_answer_that_asks_nothing_is_not_a_goodbye() -> None:
    doc = yaml.safe_load(DEFAULT_TEXT)
    doc["prompts"]["balance"] = "Your balance is in your latest statement."
    policy = parse_policy(yaml.safe_dump(doc, sort_keys=False))
    decisions, _ = run([U("check_balance", 0.97), NO], policy=policy)
    assert trace(decisions)[-1] == ("reprompt", "no_context")


# -- a frustrated caller answering the callback offer ------------------------------------------------


@pytest.mark.parametrize("answer,expected", [
    ("affirm", ("hangup", "callback", "callback_done")),
    ("deny", ("hangup", "goodbye", "callback_declined")),
])
def test_frustrated_caller_gets_the_callback_they_accept(answer: str, expected: tuple[str, str, str]) -> None:
    """Queue closed: the frustration rule offers a callback. A still-frustrated "yes" used to re-run the
    frustration rule, which, the offer already made, said "Okay. Please call back during business hours"."""
    decisions, _ = run([U("check_balance", 0.97, caller_state=FRUSTRATED),
                        U(answer, 0.95, caller_state=FRUSTRATED)], NIGHT)
    assert (decisions[1].action, decisions[1].reason) == ("confirm", "out_of_hours")
    d = decisions[-1]
    assert (d.action, d.reason, d.prompt) == (expected[0], expected[1], POLICY.prompts[expected[2]])


def test_frustrated_caller_saying_something_else_to_the_offer_is_let_go() -> None:
    d = run([U("check_balance", 0.97, caller_state=FRUSTRATED),
             U("check_balance", 0.97, caller_state=FRUSTRATED)], NIGHT)[0][-1]
    assert (d.action, d.reason) == ("hangup", "out_of_hours")


# -- "agent" while a value is asked for ----------------------------------------------------------------


def test_agent_request_in_its_confirm_band_during_slot_collection_is_confirmed() -> None:
    """ "How much would you like to pay?" -> "agent" heard at 0.6 (speak_to_agent confirms from 0.4): the
    caller is asked whether they want a person, as anywhere else, not told "Sorry, I didn't get that"."""
    agent = POLICY.escalation.agent_request.intent
    conf = (POLICY.confirm_for(agent) + POLICY.accept_for(agent)) / 2
    decisions, _ = run([U("pay_bill", 0.95), U(agent, conf), YES])
    assert trace(decisions) == [("collect", "slot_missing"), ("confirm", "confirm_requested"),
                                ("transfer", "agent_requested")]
    assert decisions[2].prompt == "You'd like to speak to an agent, is that right?"
    # the same during a read-back (already so) and with the keypad's 0 (already so)
    assert run([U("pay_bill", 0.95, slots={"amount": 40.0}), U(agent, conf)])[0][-1].intent == agent
    assert run([U("pay_bill", 0.95), DtmfDigit("0")])[0][-1].reason == "agent_requested"
    # below its confirm band it is just not understood: the amount is asked again
    d = run([U("pay_bill", 0.95), U(agent, POLICY.confirm_for(agent) / 2)])[0][-1]
    assert (d.action, d.reason, d.intent) == ("collect", "slot_missing", "pay_bill")


# -- "A, or B?" -> "yes" ----------------------------------------------------------------------------


def test_yes_to_an_either_or_question_asks_the_choice_again() -> None:
    """It used to drop the question: "What can I help you with today?" (reason no_context, with a
    question pending)."""
    decisions, _ = run([AMBIGUOUS, YES])
    d = decisions[-1]
    assert (d.action, d.reason, d.options) == ("clarify", "low_confidence", ("pay_bill", "check_balance"))
    assert d.prompt == f"{POLICY.prompts['slot_retry']} {decisions[1].prompt}"
    # answered next time: acted on
    pick = U("check_balance", 0.9, [("check_balance", 0.9), ("pay_bill", 0.05)])
    assert trace(run([AMBIGUOUS, YES, pick])[0])[-1] == ("answer", "clarified")
    # answered with "yes" every time: escalated like any failed turn, within the loop bound
    decisions, state = run([AMBIGUOUS] + [YES] * K)
    assert state.ended and decisions[-1].action == "transfer" and len(decisions) - 1 <= K


# -- failures counted across kinds --------------------------------------------------------------------


@pytest.mark.parametrize("request_turn", [
    [U("pay_bill", 0.95)],  # understood at last
    [U("pay_bill", 0.7), YES],  # confirmed
    [DtmfDigit("1")],  # chosen from the keypad menu
], ids=["accepted", "confirmed", "keypad"])
def test_an_understood_request_ends_the_run_of_failures(request_turn: list[Input]) -> None:
    """Three mumbles (keypad menu offered), then the request is understood and the amount asked for: one
    unclear amount re-asks it. It used to transfer ("I'm having trouble understanding"): the failures
    before the request still counted."""
    decisions, state = run([MUMBLE, MUMBLE, MUMBLE][: K - len(request_turn) - 2] + request_turn + [MUMBLE])
    d = decisions[-1]
    assert (d.action, d.reason, d.intent) == ("collect", "slot_missing", "pay_bill"), trace(decisions)
    assert state.failures == 1


def test_read_back_denied_again_and_again_still_escalates() -> None:
    """Saying the amount again after a "no" is not a new request: the "no"s keep counting."""
    again = U(None, 0.9, slots={"amount": 40.0})
    decisions, state = run([U("pay_bill", 0.95, slots={"amount": 40.0}), NO, again, NO, again, NO])
    assert state.ended and decisions[-1].action == "transfer"


def test_a_question_asked_again_after_a_denied_read_back_drops_the_old_apology() -> None:
    """ "No" to the read-back: "Sorry about that. How much would you like to pay?". An unclear answer used to
    get "Sorry, I didn't get that. Sorry about that. How much...", silence "Are you still there? Sorry about
    that. How much..."."""
    decisions, _ = run([U("pay_bill", 0.95, slots={"amount": 40.0}), NO, MUMBLE, NoInput()])
    ask = POLICY.prompts["ask_amount"]
    assert decisions[2].prompt == f"{POLICY.prompts['value_denied']} {ask}"
    assert decisions[3].prompt == f"{POLICY.prompts['slot_retry']} {ask}"
    assert decisions[4].prompt == f"{POLICY.prompts['still_there']} {ask}"


def _always_open() -> Policy:
    doc = yaml.safe_load(DEFAULT_TEXT)
    for q in doc["queues"].values():
        q.pop("hours", None)
        q.pop("out_of_hours", None)
    return parse_policy(yaml.safe_dump(doc, sort_keys=False))


OPEN_POLICY = _always_open()  # the live CallPolicy reads the clock: queues open around the clock


@settings(max_examples=150, deadline=None)
@given(seq=st.lists(caller_inputs([*POLICY.intents, "not_in_catalog", None]), min_size=1, max_size=40))
def test_every_transfer_hands_over_a_full_context(seq: list[Input]) -> None:
    """Through the live call's CallPolicy: whatever ends in a transfer carries intent, slots, transcript,
    tries, failures and reason, as JSON; a failure transfer reports the failed turns that caused it."""
    import json

    from bot.conversation_policy import CallPolicy

    cp = CallPolicy(OPEN_POLICY, "1")
    cp.greeting()
    for inp in seq:
        if isinstance(inp, Understanding):
            d = cp.on_turn(inp)
        elif isinstance(inp, NoInput):
            d = cp.on_no_input()
        else:
            assert isinstance(inp, DtmfDigit)
            d = cp.on_dtmf(inp.digits)
        if d.action == "transfer":
            ctx = json.loads(json.dumps(cp.handoff_context(d)))
            assert {"intent", "slots", "transcript", "tries", "failures", "reason", "queue"} <= set(ctx)
            assert ctx["reason"] == d.reason and ctx["queue"] == d.target and ctx["tries"] == cp.state.turn
            if d.reason == "max_failures" and cp.prev_state is not None and cp.prev_state.stalls + 1 < K:
                assert ctx["failures"] == OPEN_POLICY.escalation.max_failures.count, ctx
            if cp.request is not None:
                assert ctx["intent"] is not None, "a request was in progress: the agent must learn which"
        if cp.state.ended:
            break
