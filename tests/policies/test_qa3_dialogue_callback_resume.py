"""QA of the conversation's judgment, round 3 (2026-12-01): a caller in the middle of a request (a payment's amount
asked for or read back) who asks for a person while the queue is closed is offered a callback; declining it goes
back to the request with its values ("Okay, let's pick up where we left off. How much would you like to pay?")
instead of saying goodbye and losing the payment. Nearby paths: values said to the offer, the offers made by the
failure rule (still end), a frustrated caller's unsure answer to the offer, a value the slot question did not ask
for, the request said again at its own question, "agent" said repeatedly at a read-back."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.conversation_policy import CallPolicy
from engine.types import Understanding
from policies.decide import CallState, DtmfDigit, Input, NoInput
from policies.decision import Decision
from policies.schema import Policy, load_policy, parse_policy
from tests.helpers.bot import open_policy
from tests.helpers.dialogue_inputs import play, sure_turns
from tests.helpers.policy_text import DEFAULT_TEXT

POLICY = load_policy()
UTC = dt.timezone.utc
OPEN = dt.datetime(2026, 11, 23, 15, 0, tzinfo=UTC)  # Monday 10:00 New York: every queue open
NIGHT = dt.datetime(2026, 11, 24, 3, 0, tzinfo=UTC)  # Monday 22:00 New York: every queue closed, callback offered
K = POLICY.escalation.max_failures.max_stalled_turns
MAX_FAILURES = POLICY.escalation.max_failures.count
FRUSTRATED = {"frustration": 0.95}


def U(intent: str | None, conf: float = 0.95, alts: list[tuple[str | None, float]] | None = None,
      **kw: Any) -> Understanding:
    return Understanding(intent=intent, confidence=conf, alternatives=alts or [(intent, conf)], **kw)


YES, NO = U("affirm"), U("deny")
PAY = U("pay_bill")  # "How much would you like to pay?"
PAY40 = U("pay_bill", slots={"amount": 40.0})  # "That's a payment of 40 dollars, is that right?"
AGENT = U("speak_to_agent")
MUMBLE = U("pay_bill", 0.1, [("pay_bill", 0.1), ("check_balance", 0.05)])
ASK_AMOUNT = POLICY.prompts["ask_amount"]
READ_BACK_40 = "That's a payment of 40 dollars, is that right?"
PICK_UP = POLICY.prompts["resume_after_callback"]


def run(inputs: list[Input], now: dt.datetime = NIGHT, policy: Policy = POLICY) -> tuple[list[Decision], CallState]:
    return play(policy, inputs, now)


def last(inputs: list[Input], now: dt.datetime = NIGHT) -> Decision:
    return run(inputs, now)[0][-1]


def is_offer(d: Decision) -> bool:
    """The callback offer, or the offer asked again (after silence, "say that again", an unclear answer)."""
    return (d.action, d.intent) == ("confirm", None) and d.target is not None


# -- the reported case: "no" to the callback offer goes back to the payment ------------------------------------

ASKS_FOR_A_PERSON = {
    "agent": [AGENT],
    "agent_unsure_then_yes": [U("speak_to_agent", 0.5), YES],  # "You'd like to speak to an agent?" - "yes"
    "key_0": [DtmfDigit("0")],
    "frustrated": [U(None, 0.9, caller_state=FRUSTRATED)],
    "cancel": [U("cancel_service", 0.98)],  # retention closed -> general closed -> callback offer
}
BEFORE = {
    "amount_asked": ([PAY], ("collect", {}, ASK_AMOUNT)),
    "read_back": ([PAY40], ("confirm", {"amount": 40.0}, READ_BACK_40)),
}


@pytest.mark.parametrize("person", ASKS_FOR_A_PERSON)
@pytest.mark.parametrize("before", BEFORE)
def test_declining_the_callback_goes_back_to_the_request(before: str, person: str) -> None:
    """It used to say "Okay. Please call back during business hours. Goodbye." and hang up: the payment the caller
    was in the middle of was lost, though they had only declined the callback."""
    turns, (action, slots, question) = BEFORE[before]
    no = U("deny", 0.95, caller_state=FRUSTRATED) if person == "frustrated" else NO
    decisions, state = run([*turns, *ASKS_FOR_A_PERSON[person], no])
    assert is_offer(decisions[-2]) and decisions[-2].reason == "out_of_hours", decisions[-2]
    d = decisions[-1]
    assert (d.action, d.reason, d.intent, d.slots) == (action, "resumed", "pay_bill", slots), d
    assert d.prompt == f"{PICK_UP} {question}"
    assert not state.ended and state.failures == 0  # declining the offer is no failed turn


@pytest.mark.parametrize("before", BEFORE)
def test_after_declining_the_payment_is_completed(before: str) -> None:
    turns = BEFORE[before][0]
    rest = [U(None, 0.9, slots={"amount": 40.0}), YES] if before == "amount_asked" else [YES]
    decisions, _ = run([*turns, AGENT, NO, *rest])
    d = decisions[-1]
    assert (d.action, d.reason, d.intent, d.slots) == ("answer", "confirmed", "pay_bill", {"amount": 40.0})
    assert d.prompt.startswith("Okay, I've set up a payment of 40 dollars.")


def test_declining_with_nothing_interrupted_still_ends_politely() -> None:
    for before in ([], [U("check_balance", 0.97)]):  # at the greeting; after a served request ("Anything else?")
        decisions, state = run([*before, AGENT, NO])
        d = decisions[-1]
        assert (d.action, d.reason, d.prompt) == ("hangup", "goodbye", POLICY.prompts["callback_declined"])
        assert state.ended


def test_yes_to_the_offer_mid_request_is_the_callback() -> None:
    for answer in (YES, U("affirm", 0.95, caller_state=FRUSTRATED)):
        d = last([PAY, AGENT, answer])
        assert (d.action, d.reason, d.prompt) == ("hangup", "callback", POLICY.prompts["callback_done"])


def test_a_value_said_to_the_offer_answers_the_interrupted_question() -> None:
    """ "No, fifty dollars" (or just "fifty", or 50#) to the callback offer: the amount, read back."""
    for answer in (U("deny", slots={"amount": 50.0}), U(None, 0.9, slots={"amount": 50.0}), DtmfDigit("50#")):
        for before in ([PAY], [PAY40]):
            d = last([*before, AGENT, answer])
            assert (d.action, d.reason, d.slots) == ("confirm", "read_back", {"amount": 50.0}), (before, answer, d)


def test_silence_and_say_that_again_keep_the_way_back() -> None:
    for between in (NoInput(), U("repeat")):
        decisions, _ = run([PAY, AGENT, between, NO])
        assert is_offer(decisions[-2]) and decisions[-2].resume is not None
        d = decisions[-1]
        assert (d.action, d.reason, d.prompt) == ("collect", "resumed", f"{PICK_UP} {ASK_AMOUNT}")


def test_an_unclear_answer_after_going_back_does_not_repeat_the_pick_up_line() -> None:
    d = last([PAY, AGENT, NO, MUMBLE])
    assert d.prompt == f"{POLICY.prompts['slot_retry']} {ASK_AMOUNT}"


def test_the_offer_made_by_the_failure_rule_still_ends_when_declined() -> None:
    """The bot could not get the amount; the failure rule offered the callback: a "no" ends the call politely
    (going back to the amount would restart the loop that led there)."""
    decisions, state = run([PAY, *[MUMBLE] * MAX_FAILURES, NO])
    assert is_offer(decisions[-2]) and decisions[-2].resume is None
    assert (decisions[-1].action, decisions[-1].prompt) == ("hangup", POLICY.prompts["callback_declined"])
    assert state.ended


def test_asking_for_a_person_again_and_again_still_ends() -> None:
    """Agent -> "no" -> agent -> "no" ...: bounded by the stall limit, like any back and forth."""
    decisions, state = run([PAY, *[AGENT, NO] * K])
    assert state.ended and len(decisions) - 1 <= K
    assert decisions[-1].action == "hangup"


def _never_open() -> Policy:
    doc = yaml.safe_load(DEFAULT_TEXT)
    for q in doc["queues"].values():
        if "hours" in q:
            q["hours"] = {"timezone": "UTC", "weekly": {}}
    return parse_policy(yaml.safe_dump(doc, sort_keys=False))


def test_the_live_call_goes_back_and_finishes_the_payment() -> None:
    """Through the live call's CallPolicy (it reads the clock: the queues are never open here): the call is not
    ended as out of hours, and the request in progress stays the payment."""
    cp = CallPolicy(_never_open(), "1")
    cp.greeting()
    cp.on_turn(PAY)
    offer = cp.on_turn(AGENT)
    assert is_offer(offer)
    back = cp.on_turn(NO)
    assert (back.action, back.reason, back.intent) == ("collect", "resumed", "pay_bill")
    assert cp.end_reason(back) == "resumed" and not cp.state.ended
    assert cp.request == ("pay_bill", {})
    assert cp.on_turn(U(None, 0.9, slots={"amount": 40.0})).reason == "read_back"
    done = cp.on_turn(YES)
    assert (done.action, done.reason, done.slots) == ("answer", "confirmed", {"amount": 40.0})


# -- a frustrated caller's unsure answer to the callback offer -----------------------------------------------------


@pytest.mark.parametrize("answer", ["affirm", "deny"])
def test_a_frustrated_unsure_answer_to_the_offer_asks_it_again(answer: str) -> None:
    """A frustrated "yes" heard under context_accept used to re-run the frustration rule, which (the offer made)
    said "Please call back during business hours. Goodbye.": the opposite of the callback they may have said yes
    to. Asked again, as any caller's unsure answer is."""
    conf = (POLICY.thresholds.context_accept + POLICY.confirm_for(answer)) / 2
    frustrated = [U("check_balance", 0.97, caller_state=FRUSTRATED), U(answer, conf, caller_state=FRUSTRATED)]
    decisions, state = run(frustrated)
    d = decisions[-1]
    assert is_offer(d) and d.reason == "low_confidence" and d.prompt.startswith(POLICY.prompts["slot_retry"]), d
    assert not state.ended
    d = last([*frustrated, U(answer, 0.95, caller_state=FRUSTRATED)])
    assert d.reason == ("callback" if answer == "affirm" else "goodbye")
    # anything else from a frustrated caller at the offer still lets them go (unchanged)
    d = last([U("check_balance", 0.97, caller_state=FRUSTRATED), U("check_balance", 0.97, caller_state=FRUSTRATED)])
    assert (d.action, d.reason) == ("hangup", "out_of_hours")


# -- a value the slot question did not ask for; the request said again -------------------------------------------


def test_an_account_number_given_for_the_amount_is_kept_for_the_agent(tmp_path: Path) -> None:
    """ "How much would you like to pay?" -> "1 2 3 4" (an account number): it used to be dropped, so the agent
    the caller then asked for did not get it, and the caller heard "Sorry, I didn't get that" for a number that
    was heard."""
    cp = CallPolicy(load_policy(str(open_policy(tmp_path / "policy.yaml"))), "1")
    cp.greeting()
    cp.on_turn(PAY)
    again = cp.on_turn(U(None, 0.9, slots={"account_number": "1234"}, transcript="one two three four"))
    assert (again.action, again.reason, again.intent, again.prompt) == ("collect", "slot_missing", "pay_bill",
                                                                        ASK_AMOUNT)
    assert cp.state.offered == {"account_number": "1234"}
    d = cp.on_turn(AGENT)
    assert d.action == "transfer"
    ctx = cp.handoff_context(d)
    assert ctx["slots"] == {"account_number": "1234"} and ctx["intent"] == "pay_bill", ctx


def test_an_unclear_answer_still_hears_sorry() -> None:
    d = last([PAY, MUMBLE], OPEN)
    assert d.prompt == f"{POLICY.prompts['slot_retry']} {ASK_AMOUNT}"


@pytest.mark.parametrize("request_, question", [(PAY, ASK_AMOUNT),
                                                (U("schedule_technician"), POLICY.prompts["ask_day"])])
def test_the_request_said_again_at_its_question_asks_it_without_sorry(request_: Understanding, question: str) -> None:
    """ "How much would you like to pay?" -> "I want to pay my bill": the caller was understood; "Sorry, I didn't
    get that" told them otherwise. Still a turn that did not answer: said again and again, it ends."""
    decisions, state = run([request_, request_], OPEN)
    assert (decisions[-1].action, decisions[-1].reason, decisions[-1].prompt) == ("collect", "slot_missing", question)
    decisions, state = run([request_] * (K + 1), OPEN)
    assert state.ended and decisions[-1].action == "transfer" and len(decisions) - 1 <= K


# -- "no, fifty" at a read-back; "agent" said at a read-back while the queue is open ------------------------------


@pytest.mark.parametrize("answer", [U("deny", 0.95, slots={"amount": 50.0}), U("deny", 0.6, slots={"amount": 50.0}),
                                    U(None, 0.9, slots={"amount": 50.0})], ids=["no_fifty", "unsure_no_fifty", "fifty"])
def test_a_new_amount_said_at_the_read_back_is_read_back(answer: Understanding) -> None:
    decisions, _ = run([PAY40, answer, YES], OPEN)
    assert (decisions[-2].action, decisions[-2].reason, decisions[-2].slots) == ("confirm", "read_back",
                                                                                 {"amount": 50.0})
    assert decisions[-2].prompt == "That's a payment of 50 dollars, is that right?"
    assert (decisions[-1].reason, decisions[-1].slots) == ("confirmed", {"amount": 50.0})


def test_agent_said_repeatedly_at_a_read_back_reaches_a_person() -> None:
    agent = POLICY.escalation.agent_request.intent
    band = (POLICY.confirm_for(agent) + POLICY.accept_for(agent)) / 2
    d = last([PAY40, U(agent, band), U(agent, band)], OPEN)
    assert (d.action, d.reason, d.target) == ("transfer", "agent_requested", "general")
    # heard under its confirm band each time: not understood, but the failure rule still gets them to a person
    decisions, state = run([PAY40, *[U(agent, POLICY.confirm_for(agent) / 2)] * MAX_FAILURES], OPEN)
    assert state.ended and decisions[-1].action == "transfer"


# -- any call: a callback offer that interrupted a request, declined, goes back to it ---------------------------


@settings(max_examples=150, deadline=None)
@given(seq=st.lists(sure_turns([*POLICY.intents]), min_size=1, max_size=12))
def test_a_declined_offer_that_interrupted_a_request_always_goes_back(seq: list[Input]) -> None:
    decisions, state = run(seq)
    if state.ended:
        return
    back = state.interrupted
    offer = state.last
    if offer is None or not is_offer(offer) or back is None:
        return
    d, _ = run([*seq, NO])
    d = d[-1]
    if d.action in ("transfer", "hangup") and d.reason in ("max_failures", "out_of_hours"):
        return  # the stall limit: the loop guard ends the call
    assert d.intent == back.intent and d.reason == "resumed", (d, back)
    assert dict(d.slots) == dict(back.slots)


# -- a frustrated "no" to a read-back, the queue closed ------------------------------------------------------------


@pytest.mark.parametrize("answer, expected", [
    (U("deny", caller_state=FRUSTRATED), ("collect", {}, f"{PICK_UP} {ASK_AMOUNT}")),
    (U("deny", slots={"amount": 50.0}, caller_state=FRUSTRATED),
     ("confirm", {"amount": 50.0}, f"{PICK_UP} That's a payment of 50 dollars, is that right?")),
    (U(None, 0.9, caller_state=FRUSTRATED), ("confirm", {"amount": 40.0}, f"{PICK_UP} {READ_BACK_40}")),
    (U("deny", slot_candidates={"amount": [50, 40]}, caller_state=FRUSTRATED),
     ("confirm", {"amount": 50}, f"{PICK_UP} That's a payment of 50 dollars, is that right?")),
    (U("deny", slots={"amount": 40.0}, caller_state=FRUSTRATED), ("collect", {}, f"{PICK_UP} {ASK_AMOUNT}")),
], ids=["no", "no_fifty", "something_else", "no_fifty_not_forty", "no_forty_heard_again"])
def test_a_frustrated_no_to_the_read_back_does_not_come_back_to_the_wrong_amount(
        answer: Understanding, expected: tuple[str, dict[str, Any], str]) -> None:
    """ "That's 40 dollars, right?" -> "NO!" (frustrated: a callback offered) -> "no": the way back asks for the
    amount (or reads back the one said instead), never "That's a payment of 40 dollars" again."""
    decisions, _ = run([PAY40, answer, NO])
    assert is_offer(decisions[-2]) and decisions[-2].reason == "out_of_hours"
    d = decisions[-1]
    assert (d.action, d.slots, d.prompt) == expected and d.intent == "pay_bill", d
