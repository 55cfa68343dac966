"""A call's progress survives a lost Twilio stream: CallPolicy.snapshot() is kept in the call's record after
every decision, and the worker that takes the new stream restores it (bot/conversation.py). The snapshot must
round-trip through JSON exactly, re-ask only a question still pending, and be refused when the policy in use
no longer has what it names."""

from __future__ import annotations

import json

from bot.conversation_policy import CallPolicy
from engine.types import Understanding
from policies.schema import load_policy


def _u(intent: str | None, conf: float = 0.97, **slots: object) -> Understanding:
    return Understanding(intent=intent, confidence=conf, alternatives=[], slots=dict(slots))


def _carried(cp: CallPolicy, policy: object | None = None) -> CallPolicy:
    back = CallPolicy(policy or cp.policy, cp.version)
    assert back.restore(json.loads(json.dumps(cp.snapshot(), default=str)))
    return back


def test_a_pending_read_back_is_asked_again_and_its_yes_pays_that_amount() -> None:
    cp = CallPolicy(load_policy(None), "v1")
    cp.greeting()
    cp.on_turn(_u("pay_bill", amount=40))
    back = _carried(cp)
    assert back.state == cp.state and back.request == cp.request and back.transcript == cp.transcript
    q = back.pending_question()
    assert q is not None and q.action == "confirm" and "40" in q.prompt
    d = back.on_turn(_u("affirm"))
    assert (d.action, d.reason, d.slots) == ("answer", "confirmed", {"amount": 40})


def test_nothing_pending_after_an_answer_and_counters_carry_over() -> None:
    cp = CallPolicy(load_policy(None), "v1")
    cp.greeting()
    cp.on_turn(_u("check_balance"))
    cp.on_turn(_u(None, conf=0.1))  # a failed turn: the reprompt is no question to re-ask
    back = _carried(cp)
    assert back.pending_question() is None
    assert back.state.failures == cp.state.failures == 1 and back.state.turn == cp.state.turn


def test_a_snapshot_the_policy_cannot_honour_is_refused() -> None:
    policy = load_policy(None)
    cp = CallPolicy(policy, "v1")
    cp.greeting()
    cp.on_turn(_u("pay_bill", amount=40))
    snap = json.loads(json.dumps(cp.snapshot(), default=str))
    other = policy.model_copy(update={"intents": {k: v for k, v in policy.intents.items() if k != "pay_bill"}})
    fresh = CallPolicy(other, "v2")
    assert not fresh.restore(snap) and fresh.state.turn == 0  # a publish removed the intent being paid
    for bad in ({}, {"state": {"now": "not a time"}}, {"state": []}, None, "x"):
        assert not CallPolicy(policy, "v1").restore(bad)
