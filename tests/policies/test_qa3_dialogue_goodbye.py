"""QA of the conversation's judgment, round 3 (2026-12-01): a goodbye part way through a request that takes several
values (the amount given, the day still asked for) says that nothing was done ("Okay, I haven't gone ahead with
that."), as a goodbye at a read-back already does; "Thanks for calling. Goodbye." sounded like a done deal."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import yaml

from engine.types import Understanding
from policies.decide import Input
from policies.schema import Policy, load_policy, parse_policy
from tests.helpers.dialogue_inputs import play
from tests.helpers.policy_text import DEFAULT_TEXT

OPEN = dt.datetime(2026, 11, 23, 15, 0, tzinfo=dt.timezone.utc)  # Monday 10:00 New York: every queue open


def U(intent: str | None, conf: float = 0.95, **kw: Any) -> Understanding:
    return Understanding(intent=intent, confidence=conf, alternatives=[(intent, conf)], **kw)


def _two_value_payment() -> Policy:
    """A payment that takes an amount and a day, read back once both are known."""
    doc = yaml.safe_load(DEFAULT_TEXT)
    doc["prompts"]["ask_pay_day"] = "What day should we take the payment?"
    doc["prompts"]["confirm_payment"] = "That's a payment of {amount} dollars on {day}, is that right?"
    doc["prompts"]["payment_taken"] = "Okay, I've set up a payment of {amount} dollars on {day}. Anything else?"
    doc["intents"]["pay_bill"]["slots"] = ["amount", "day"]
    doc["intents"]["pay_bill"]["action"] = {
        "type": "collect", "collect": ["amount", "day"], "ask": {"amount": "ask_amount", "day": "ask_pay_day"},
        "prompt": "payment_taken", "read_back": "confirm_payment"}
    return parse_policy(yaml.safe_dump(doc, sort_keys=False))


POLICY = _two_value_payment()
BYE = U("goodbye")


@pytest.mark.parametrize("before, unconfirmed", [
    ([U("pay_bill", slots={"amount": 40.0})], True),  # the amount given, the day asked for
    ([U("pay_bill"), U(None, 0.9, slots={"amount": 40.0})], True),  # the same, the amount said on its own
    ([U("pay_bill", slots={"amount": 40.0}), U("check_balance", 0.85)], True),  # "You'd like to check ...?"
    ([U("pay_bill")], False),  # nothing given yet: the caller knows nothing was done
    ([U("pay_bill", slots={"amount": 40.0, "day": "friday"}), U("affirm")], False),  # paid
], ids=["amount_then_day_asked", "amount_answered", "changed_mind_question", "nothing_given", "paid"])
def test_goodbye_part_way_through_says_nothing_was_done(before: list[Input], unconfirmed: bool) -> None:
    decisions, state = play(POLICY, [*before, BYE], OPEN)
    d = decisions[-1]
    assert (d.action, d.reason) == ("hangup", "goodbye") and state.ended
    assert d.prompt == POLICY.prompts["goodbye_unconfirmed" if unconfirmed else "goodbye"], (before, d.prompt)


def test_the_default_policy_keeps_its_goodbyes() -> None:
    default = load_policy()
    for before in ([U("pay_bill")], [U("schedule_technician")]):
        d = play(default, [*before, BYE], OPEN)[0][-1]
        assert d.prompt == default.prompts["goodbye"]
