"""QA of the conversation's judgment, round 3 (2026-12-01): values said to a yes/no question. "You'd like to pay your
bill?" -> "forty dollars" is a yes with the amount (it used to be "What can I help you with today?", the payment
dropped and a failed turn counted); a value that answers nothing pending (an account number at a read-back) asks
the pending question again and keeps the value for the human agent."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from bot.conversation_policy import CallPolicy
from engine.types import Understanding
from policies.decide import CallState, Input
from policies.decision import Decision
from policies.schema import Policy, load_policy
from tests.helpers.bot import open_policy
from tests.helpers.dialogue_inputs import play

POLICY = load_policy()
OPEN = dt.datetime(2026, 11, 23, 15, 0, tzinfo=dt.timezone.utc)  # Monday 10:00 New York: every queue open


def U(intent: str | None, conf: float = 0.95, **kw: Any) -> Understanding:
    return Understanding(intent=intent, confidence=conf, alternatives=[(intent, conf)], **kw)


YES = U("affirm")
UNSURE_PAY = U("pay_bill", 0.5)  # "You'd like to pay your bill, is that right?"
UNSURE_VISIT = U("schedule_technician", 0.5)  # "You'd like to book a technician visit, is that right?"
ACCOUNT = U(None, 0.9, slots={"account_number": "1234"})


def run(inputs: list[Input], policy: Policy = POLICY) -> tuple[list[Decision], CallState]:
    return play(policy, inputs, OPEN)


@pytest.mark.parametrize("asked, value, read_back, done", [
    (UNSURE_PAY, {"amount": 40.0}, "That's a payment of 40 dollars, is that right?", "Okay, I've set up a payment"),
    (UNSURE_VISIT, {"day": "friday"}, "That's a technician visit on Friday, is that right?",
     "Okay, a technician is booked for Friday."),
])
def test_a_value_said_to_you_would_like_to_is_a_yes_read_back(asked: Understanding, value: dict[str, Any],
                                                              read_back: str, done: str) -> None:
    decisions, state = run([asked, U(None, 0.9, slots=value)])
    assert decisions[1].reason == "confirm_requested"
    d = decisions[-1]
    assert (d.action, d.reason, d.intent, d.slots, d.prompt) == ("confirm", "read_back", asked.intent, value,
                                                                 read_back)
    assert state.failures == 0  # the caller answered: no failed turn
    decisions, _ = run([asked, U(None, 0.9, slots=value), YES])
    assert (decisions[-1].reason, decisions[-1].slots) == ("confirmed", value)
    assert decisions[-1].prompt.startswith(done)


def test_an_unsure_value_to_you_would_like_to_is_not_taken() -> None:
    d = run([UNSURE_PAY, U(None, 0.3, slots={"amount": 40.0})])[0][-1]
    assert (d.action, d.intent, d.slots) == ("confirm", "pay_bill", {})  # the question asked again, nothing paid


@pytest.mark.parametrize("before, question, after_yes", [
    ([UNSURE_PAY], "You'd like to pay your bill, is that right?", ("collect", "slot_missing")),  # "How much...?"
    ([U("pay_bill", slots={"amount": 40.0})], "That's a payment of 40 dollars, is that right?",
     ("answer", "confirmed")),
], ids=["confirm", "read_back"])
def test_a_value_that_answers_nothing_pending_asks_the_question_again(before: list[Input], question: str,
                                                                     after_yes: tuple[str, str]) -> None:
    """An account number said to a yes/no question: the question again (a failed turn), the value kept. It used
    to be "What can I help you with today?": the payment being confirmed was dropped."""
    decisions, state = run([*before, ACCOUNT])
    d = decisions[-1]
    assert (d.action, d.intent, d.prompt) == ("confirm", "pay_bill", question), d
    assert state.offered == {"account_number": "1234"} and state.failures == 1
    decisions, _ = run([*before, ACCOUNT, YES])
    assert (decisions[-1].action, decisions[-1].reason, decisions[-1].intent) == (*after_yes, "pay_bill")


def test_a_value_with_nothing_asked_is_still_out_of_context() -> None:
    decisions, state = run([ACCOUNT])
    assert (decisions[-1].action, decisions[-1].reason) == ("reprompt", "no_context")
    assert state.offered == {"account_number": "1234"}


def test_the_agent_gets_the_account_number_said_at_the_confirmation(tmp_path: Path) -> None:
    cp = CallPolicy(load_policy(str(open_policy(tmp_path / "policy.yaml"))), "1")
    cp.greeting()
    cp.on_turn(UNSURE_PAY)
    cp.on_turn(ACCOUNT)
    d = cp.on_turn(U("speak_to_agent"))
    assert d.action == "transfer"
    ctx = cp.handoff_context(d)
    assert ctx["intent"] == "pay_bill" and ctx["slots"] == {"account_number": "1234"}, ctx
