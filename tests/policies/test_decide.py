"""decide()/next_state() on the default policy, table-driven: every action and every reason code."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
import yaml

from engine.types import Understanding
from policies.decide import (
    REASONS,
    CallStart,
    CallState,
    DtmfDigit,
    EngineFailure,
    Input,
    NoInput,
    RedisFailure,
    decide,
    next_state,
    step,
    system_error_route,
)
from policies.decision import ACTIONS, Decision
from policies.schema import Policy, load_policy, parse_policy
from tests.helpers.policy_text import DEFAULT_TEXT

POLICY = load_policy()
UTC = dt.timezone.utc
OPEN = dt.datetime(2026, 11, 23, 15, 0, tzinfo=UTC)  # Monday 10:00 New York: every queue open
NIGHT = dt.datetime(2026, 11, 24, 3, 0, tzinfo=UTC)  # Monday 22:00 New York: every queue but repair closed
EARLY = dt.datetime(2026, 11, 23, 13, 30, tzinfo=UTC)  # Monday 08:30 New York: general open, billing not yet


def U(intent: str | None, conf: float, alts: list[tuple[str | None, float]] | None = None, **kw: Any) -> Understanding:
    return Understanding(intent=intent, confidence=conf, alternatives=alts or [(intent, conf)], **kw)


LOW = U("pay_bill", 0.1, [("pay_bill", 0.1), ("check_balance", 0.05)])
YES, NO = U("affirm", 0.95), U("deny", 0.95)


def run(inputs: list[Input], now: dt.datetime = OPEN, policy=POLICY) -> tuple[list[Decision], CallState]:
    state = CallState(now=now)
    out = []
    for inp in [CallStart(), *inputs]:
        d, state = step(policy, state, inp)
        out.append(d)
    return out, state


# name, inputs after the greeting, time, expected (action, reason, target, intent) of the last decision
CASES: list[tuple[str, list[Input], dt.datetime, tuple[str, str, str | None, str | None]]] = [
    ("greeting", [], OPEN, ("answer", "greeting", None, None)),
    ("accepted answer", [U("check_balance", 0.97)], OPEN, ("answer", "accepted", None, "check_balance")),
    ("day read back before booking", [U("schedule_technician", 0.95, slots={"day": "friday"})], OPEN,
     ("confirm", "read_back", None, "schedule_technician")),
    ("day read back, confirmed: booked", [U("schedule_technician", 0.95, slots={"day": "friday"}), YES], OPEN,
     ("answer", "confirmed", None, "schedule_technician")),
    ("day read back, denied: asked again", [U("schedule_technician", 0.95, slots={"day": "friday"}), NO], OPEN,
     ("collect", "value_denied", None, "schedule_technician")),
    ("amount read back before paying", [U("pay_bill", 0.95, slots={"amount": 40.0})], OPEN, ("confirm", "read_back", None, "pay_bill")),
    ("read-back confirmed: paid", [U("pay_bill", 0.95, slots={"amount": 40.0}), YES], OPEN, ("answer", "confirmed", None, "pay_bill")),
    ("read-back confirmed by restating", [U("pay_bill", 0.95, slots={"amount": 40.0}), U("pay_bill", 0.8, slots={"amount": 40.0})],
     OPEN, ("answer", "confirmed", None, "pay_bill")),
    ("read-back denied: amount asked again", [U("pay_bill", 0.95, slots={"amount": 40.0}), NO], OPEN,
     ("collect", "value_denied", None, "pay_bill")),
    ("changed mind mid-collection, then no: back to the amount", [U("pay_bill", 0.95), U("cancel_service", 0.92), NO],
     OPEN, ("collect", "resumed", None, "pay_bill")),
    ("read-back corrected: new amount read back", [U("pay_bill", 0.95, slots={"amount": 40.0}),
                                                   U("deny", 0.9, slots={"amount": 14.0})], OPEN,
     ("confirm", "read_back", None, "pay_bill")),
    ("read-back corrected with the wrong value named too: the other one read back",
     [U("pay_bill", 0.95, slots={"amount": 15}), U("deny", 0.9, slot_candidates={"amount": [50, 15]})], OPEN,
     ("confirm", "read_back", None, "pay_bill")),
    ("two values heard, neither the one read back: asked again",
     [U("pay_bill", 0.95, slots={"amount": 15}), U("deny", 0.9, slot_candidates={"amount": [50, 60]})], OPEN,
     ("collect", "value_denied", None, "pay_bill")),
    ("max failures: every read-back denied", [U("pay_bill", 0.95, slots={"amount": 40.0}), NO,
                                              U(None, 0.9, slots={"amount": 40.0}), NO,
                                              U(None, 0.9, slots={"amount": 40.0}), NO], OPEN,
     ("transfer", "max_failures", "general", None)),
    ("read-back kept through silence", [U("pay_bill", 0.95, slots={"amount": 40.0}), NoInput(), YES], OPEN,
     ("answer", "confirmed", None, "pay_bill")),
    ("read-back kept through 'say that again'", [U("pay_bill", 0.95, slots={"amount": 40.0}), U("repeat", 0.9), NO], OPEN,
     ("collect", "value_denied", None, "pay_bill")),
    ("read-back kept through an unclear answer", [U("pay_bill", 0.95, slots={"amount": 40.0}), U("affirm", 0.2), YES], OPEN,
     ("answer", "confirmed", None, "pay_bill")),
    ("slot missing", [U("pay_bill", 0.95)], OPEN, ("collect", "slot_missing", None, "pay_bill")),
    ("slot filled, day read back", [U("schedule_technician", 0.95), U(None, 0.9, slots={"day": "tuesday"})], OPEN,
     ("confirm", "read_back", None, "schedule_technician")),
    ("slot filled, read back", [U("pay_bill", 0.95), U(None, 0.9, slots={"amount": 25.0})], OPEN,
     ("confirm", "read_back", None, "pay_bill")),
    ("slot value heard as goodbye is still the answer", [U("pay_bill", 0.95), U("goodbye", 0.99, slots={"amount": 25.0})], OPEN,
     ("confirm", "read_back", None, "pay_bill")),
    ("goodbye without the value while collecting", [U("pay_bill", 0.95), U("goodbye", 0.99)], OPEN,
     ("hangup", "goodbye", None, "goodbye")),
    ("slot re-asked", [U("pay_bill", 0.95), U(None, 0.2)], OPEN, ("collect", "slot_missing", None, "pay_bill")),
    ("slot question answered with a yes", [U("pay_bill", 0.95), YES], OPEN, ("collect", "slot_missing", None, "pay_bill")),
    ("slot question repeated", [U("pay_bill", 0.95), U("repeat", 0.9)], OPEN, ("collect", "repeat", None, "pay_bill")),
    ("confirm band", [U("report_outage", 0.7)], OPEN, ("confirm", "confirm_requested", None, "report_outage")),
    ("confirmed", [U("report_outage", 0.7), YES], OPEN, ("answer", "confirmed", None, "report_outage")),
    ("denied", [U("report_outage", 0.7), NO], OPEN, ("reprompt", "denied", None, None)),
    ("confirmed by restating the intent", [U("report_outage", 0.7), U("report_outage", 0.6)], OPEN,
     ("answer", "confirmed", None, "report_outage")),
    ("neither of the two", [U("pay_bill", 0.45, [("pay_bill", 0.45), ("check_balance", 0.4)]), NO], OPEN,
     ("reprompt", "denied", None, None)),
    ("confirm re-asked when unclear", [U("report_outage", 0.7), U("affirm", 0.2)], OPEN,
     ("confirm", "low_confidence", None, "report_outage")),
    ("ambiguous", [U("pay_bill", 0.45, [("pay_bill", 0.45), ("billing_dispute", 0.4)])], OPEN, ("clarify", "ambiguous", None, None)),
    ("clarified", [U("pay_bill", 0.45, [("pay_bill", 0.45), ("check_balance", 0.4)]),
                   U("check_balance", 0.85, [("check_balance", 0.85), ("pay_bill", 0.1)])], OPEN,
     ("answer", "clarified", None, "check_balance")),
    ("low confidence", [LOW], OPEN, ("reprompt", "low_confidence", None, None)),
    ("engine marked audio unusable", [U(None, 0.0, error="too_short")], OPEN, ("reprompt", "low_confidence", None, None)),
    ("unknown engine label", [U("order_pizza", 0.99)], OPEN, ("reprompt", "out_of_scope", None, None)),
    ("out of scope", [U("out_of_scope", 0.95)], OPEN, ("reprompt", "out_of_scope", None, None)),
    ("yes with nothing pending", [YES], OPEN, ("reprompt", "no_context", None, None)),
    ("slot with nothing pending", [U(None, 0.9, slots={"amount": 3.0})], OPEN, ("reprompt", "no_context", None, None)),
    ("no input reprompt", [NoInput()], OPEN, ("reprompt", "no_input", None, None)),
    ("no input twice: goodbye", [NoInput(), NoInput()], OPEN, ("hangup", "no_input", None, None)),
    ("no input keeps the pending question", [U("report_outage", 0.7), NoInput()], OPEN,
     ("confirm", "no_input", None, "report_outage")),
    ("repeat", [U("check_balance", 0.97), U("repeat", 0.9)], OPEN, ("answer", "repeat", None, "check_balance")),
    ("yes to 'Anything else?': asked what else", [U("check_balance", 0.97), YES], OPEN,
     ("answer", "anything_else", None, None)),
    ("repeat keeps confirm", [U("report_outage", 0.7), U("repeat", 0.9)], OPEN, ("confirm", "repeat", None, "report_outage")),
    ("agent requested", [U("speak_to_agent", 0.9)], OPEN, ("transfer", "agent_requested", "general", "speak_to_agent")),
    ("agent requested mid-confirm", [U("report_outage", 0.7), U("speak_to_agent", 0.8)], OPEN,
     ("transfer", "agent_requested", "general", "speak_to_agent")),
    ("sensitive: cancel", [U("cancel_service", 0.98)], OPEN, ("transfer", "sensitive_intent", "retention", "cancel_service")),
    ("sensitive: dispute", [U("billing_dispute", 0.95)], OPEN, ("transfer", "sensitive_intent", "billing", "billing_dispute")),
    ("sensitive after confirm", [U("cancel_service", 0.8), YES], OPEN, ("transfer", "sensitive_intent", "retention", "cancel_service")),
    ("frustration", [U("check_balance", 0.97, caller_state={"frustration": 0.9})], OPEN, ("transfer", "frustration", "general", None)),
    ("dtmf menu after 2 failures", [LOW, LOW], OPEN, ("dtmf_menu", "dtmf_menu", None, None)),
    ("dtmf selection", [LOW, LOW, DtmfDigit("3")], OPEN, ("answer", "dtmf_selection", None, "report_outage")),
    ("dtmf 0 is the agent", [DtmfDigit("0")], OPEN, ("transfer", "agent_requested", "general", "speak_to_agent")),
    ("dtmf invalid", [DtmfDigit("9")], OPEN, ("dtmf_menu", "dtmf_invalid", None, None)),
    ("max failures: misunderstood", [LOW, LOW, LOW, LOW], OPEN, ("transfer", "max_failures", "general", None)),
    ("max failures: keeps saying no", [U("report_outage", 0.7), NO, U("report_outage", 0.7), NO,
                                       U("report_outage", 0.7), NO], OPEN,
     ("transfer", "max_failures", "general", None)),
    ("engine error", [EngineFailure("timeout")], OPEN, ("transfer", "engine_error", "general", None)),
    ("redis error", [RedisFailure("down")], OPEN, ("transfer", "redis_error", "general", None)),
    ("engine error at night: apology, never silence", [EngineFailure("timeout")], NIGHT, ("hangup", "engine_error", "general", None)),
    ("out of hours: callback offer", [U("speak_to_agent", 0.9)], NIGHT, ("confirm", "out_of_hours", "general", None)),
    ("out of hours: next queue", [U("billing_dispute", 0.95)], EARLY, ("transfer", "out_of_hours", "general", "billing_dispute")),
    ("callback accepted", [U("speak_to_agent", 0.9), YES], NIGHT, ("hangup", "callback", "general", None)),
    ("callback declined", [U("speak_to_agent", 0.9), NO], NIGHT, ("hangup", "goodbye", None, None)),
    ("goodbye", [U("goodbye", 0.95)], OPEN, ("hangup", "goodbye", None, "goodbye")),
]


def _without_read_back(intent: str) -> Policy:
    """The shipped policy with one intent's read-back removed (an admin's choice the schema allows)."""
    doc = yaml.safe_load(DEFAULT_TEXT)
    del doc["intents"][intent]["action"]["read_back"]
    return parse_policy(yaml.safe_dump(doc, sort_keys=False))


NO_DAY_READ_BACK = _without_read_back("schedule_technician")
# collect intents that act as soon as their values are in: what a policy without read-back does
NO_READ_BACK_CASES: list[tuple[str, list[Input], dt.datetime, tuple[str, str, str | None, str | None]]] = [
    ("accepted with all slots", [U("schedule_technician", 0.95, slots={"day": "friday"})], OPEN,
     ("answer", "accepted", None, "schedule_technician")),
    ("slot filled", [U("schedule_technician", 0.95), U(None, 0.9, slots={"day": "tuesday"})], OPEN,
     ("answer", "slot_filled", None, "schedule_technician")),
]


@pytest.mark.parametrize("name,inputs,now,expected,policy",
                         [(*c, POLICY) for c in CASES] + [(*c, NO_DAY_READ_BACK) for c in NO_READ_BACK_CASES],
                         ids=[c[0] for c in CASES] + [c[0] for c in NO_READ_BACK_CASES])
def test_decision_table(name: str, inputs: list[Input], now: dt.datetime, expected: tuple, policy: Policy) -> None:
    decisions, _ = run(inputs, now, policy)
    last = decisions[-1]
    assert (last.action, last.reason, last.target, last.intent) == expected, last
    assert last.prompt, "every decision says something: never silence"
    assert all(d.action not in ("transfer", "hangup") for d in decisions[:-1]), "the call ended early"


def test_table_covers_every_action_and_reason() -> None:
    seen_actions, seen_reasons = set(), set()
    runs = [(POLICY, c[1], c[2]) for c in CASES] + [(NO_DAY_READ_BACK, c[1], c[2]) for c in NO_READ_BACK_CASES]
    for policy, inputs, now in runs:
        for d in run(inputs, now, policy)[0]:
            seen_actions.add(d.action)
            seen_reasons.add(d.reason)
    # outside decide(): a Twilio call whose streams kept failing (telephony/twilio/server.py, bot/app.py)
    seen_reasons.add(system_error_route(POLICY, "stream_lost", OPEN).reason)
    assert seen_actions == set(ACTIONS)
    assert seen_reasons == set(REASONS)


def test_system_error_route_for_a_call_whose_stream_keeps_failing() -> None:
    """The system_error rule's queue with its apology when open; closed, the apology and goodbye."""
    rule = POLICY.escalation.system_error
    d = system_error_route(POLICY, "stream_lost", OPEN)
    assert (d.action, d.reason, d.target) == ("transfer", "stream_lost", rule.queue) and d.prompt, d
    night = system_error_route(POLICY, "stream_lost", NIGHT)
    assert night.action in ("hangup", "transfer") and night.prompt, night


def test_prompts_render_slots_and_labels() -> None:
    d = run([U("pay_bill", 0.95, slots={"amount": 12.5})])[0][-1]
    assert d.prompt == "That's a payment of 12.50 dollars, is that right?"
    d = run([U("pay_bill", 0.95, slots={"amount": 12.5}), YES])[0][-1]
    assert d.prompt == "Okay, I've set up a payment of 12.50 dollars. Anything else I can help with?"
    d = run([U("pay_bill", 0.95, slots={"amount": 12.5}), NO])[0][-1]
    assert d.prompt == "Sorry about that. How much would you like to pay?" and d.slots == {}
    d = run([U("schedule_technician", 0.95, slots={"day": "tuesday"})])[0][-1]
    assert d.prompt == "That's a technician visit on Tuesday, is that right?"
    d = run([U("schedule_technician", 0.95, slots={"day": "tuesday"}), YES])[0][-1]
    assert "booked for Tuesday" in d.prompt
    d = run([U("pay_bill", 0.7)])[0][-1]
    assert d.prompt == "You'd like to pay your bill, is that right?"
    d = run([U("pay_bill", 0.45, [("pay_bill", 0.45), ("billing_dispute", 0.4)])])[0][-1]
    assert d.prompt == "Would you like to pay your bill, or dispute a charge?" and d.options == ("pay_bill", "billing_dispute")
    assert all("{" not in p for p in POLICY.static_prompts())
    for needed in ("One moment.", POLICY.prompts["apology"], POLICY.prompts["greeting"]):
        assert needed in POLICY.static_prompts()


def test_confirmed_slots_carry_through() -> None:
    # unsure of the intent: "pay your bill?", then the amount is read back, then it is paid
    decisions, state = run([U("pay_bill", 0.7, slots={"amount": 40.0}), YES, YES])
    assert [d.reason for d in decisions[1:]] == ["confirm_requested", "read_back", "confirmed"]
    assert decisions[-1].slots == {"amount": 40.0} and state.collected == {"amount": 40.0}


def test_read_back_correction_is_what_gets_paid() -> None:
    decisions, state = run([U("pay_bill", 0.95, slots={"amount": 502.0}), U("deny", 0.9, slots={"amount": 552.0}), YES])
    assert decisions[2].prompt == "That's a payment of 552 dollars, is that right?"
    assert decisions[-1].reason == "confirmed" and decisions[-1].slots == {"amount": 552.0}
    assert state.collected == {"amount": 552.0}
    # the same amount again is no correction: a plain "no" still asks again
    decisions, _ = run([U("pay_bill", 0.95, slots={"amount": 40.0}), U("deny", 0.9, slots={"amount": 40.0})])
    assert decisions[-1].reason == "value_denied"


def test_a_value_said_before_any_question_is_not_asked_for_again() -> None:
    # "fifty dollars" first: the bot asks what it is for, keeps the value, and reads it back for pay_bill
    amount, acct = U(None, 0.9, slots={"amount": 50.0}), U(None, 0.95, slots={"account_number": "44721"})
    decisions, state = run([amount, U("pay_bill", 0.97), YES])
    assert [d.reason for d in decisions[1:]] == ["no_context", "read_back", "confirmed"]
    assert decisions[2].prompt == "That's a payment of 50 dollars, is that right?"
    assert decisions[-1].slots == {"amount": 50.0} and state.collected == {"amount": 50.0} and state.offered == {}
    # a "no" to that read-back asks for the amount: the remembered value is not offered twice
    decisions, state = run([amount, U("pay_bill", 0.97), NO])
    assert (decisions[-1].action, decisions[-1].reason, decisions[-1].slots) == ("collect", "value_denied", {})
    assert state.offered == {}
    # a value said in the same turn as the request wins over the remembered one
    decisions, _ = run([amount, U("pay_bill", 0.97, slots={"amount": 20.0})])
    assert decisions[-1].slots == {"amount": 20.0}
    # values other intents do not take are kept (for the human agent), and do not leak into their slots
    decisions, state = run([acct, U("check_balance", 0.97)])
    assert decisions[-1].reason == "accepted" and decisions[-1].slots == {}
    assert state.offered == {"account_number": "44721"}
    # an unsure value (below the context threshold) is not remembered
    _, state = run([U(None, 0.2, slots={"amount": 50.0})])
    assert state.offered == {}


def test_state_counters() -> None:
    _, s = run([LOW])
    assert (s.turn, s.failures, s.stalls) == (1, 1, 1)
    _, s = run([LOW, U("check_balance", 0.97)])
    assert (s.turn, s.failures, s.stalls) == (2, 0, 0)
    _, s = run([U("report_outage", 0.7)])
    assert s.pending_confirm is not None and s.pending_confirm.intent == "report_outage"
    _, s = run([U("pay_bill", 0.45, [("pay_bill", 0.45), ("billing_dispute", 0.4)])])
    assert s.pending_clarify == ("pay_bill", "billing_dispute")
    _, s = run([U("pay_bill", 0.95)])
    assert s.pending_collect is not None and s.pending_collect.intent == "pay_bill"
    _, s = run([LOW, LOW, DtmfDigit("9")])
    assert s.menu_active and s.dtmf_digits == "9"
    _, s = run([NoInput()])
    assert s.no_inputs == 1 and s.failures == 1
    _, s = run([EngineFailure()])
    assert s.engine_error and s.ended
    d = decide(POLICY, s, U("check_balance", 0.99))
    assert d.action == "hangup", "an ended call decides nothing new"


def test_decide_is_pure() -> None:
    state = CallState(now=OPEN)
    u = U("report_outage", 0.7)
    before = dataclasses.asdict(state)
    first = decide(POLICY, state, u)
    assert decide(POLICY, state, u) == first
    assert dataclasses.asdict(state) == before
    assert next_state(state, u, first) == next_state(state, u, first)


def test_per_intent_threshold_override() -> None:
    # cancel_service needs more than the global accept (default.yaml): between the two it is confirmed first
    g, o = POLICY.thresholds.accept, POLICY.thresholds.overrides["cancel_service"].accept
    assert o is not None and o > g
    between = (g + o) / 2
    assert run([U("cancel_service", between)])[0][-1].action == "confirm"
    assert run([U("check_balance", between)])[0][-1].action == "answer"
    # speak_to_agent is accepted from 0.7
    assert run([U("speak_to_agent", 0.72)])[0][-1].reason == "agent_requested"


def test_no_input_transfer_variant() -> None:
    text = (POLICY_TEXT.replace("  then: hangup\n", "  then: transfer\n  queue: repair\n"))
    policy = parse_policy(text)
    d = run([NoInput(), NoInput()], policy=policy)[0][-1]
    assert (d.action, d.reason, d.target) == ("transfer", "no_input", "repair")


def test_out_of_hours_message_variant() -> None:
    text = POLICY_TEXT.replace("out_of_hours: {action: callback, prompt: callback_offer}",
                               "out_of_hours: {action: message, prompt: callback_declined}")
    policy = parse_policy(text)
    d = run([U("speak_to_agent", 0.9)], NIGHT, policy=policy)[0][-1]
    assert (d.action, d.reason, d.target) == ("hangup", "out_of_hours", "general")
    assert d.prompt == policy.prompts["callback_declined"]


def test_holiday_closes_a_queue() -> None:
    text = POLICY_TEXT.replace("      timezone: America/New_York\n      weekly: {mon: [\"08:00-20:00\"]",
                               "      timezone: America/New_York\n      holidays: [2026-11-23]\n      weekly: {mon: [\"08:00-20:00\"]", 1)
    policy = parse_policy(text)
    assert not policy.queues["general"].hours.is_open(OPEN)
    assert POLICY.queues["general"].hours.is_open(OPEN)


POLICY_TEXT = (load_policy.__globals__["DEFAULT_POLICY_PATH"]).read_text()


def test_digits_slot_from_the_keypad() -> None:
    text = POLICY_TEXT.replace(
        "    action: {type: answer, prompt: address_update}",
        "    slots: [account_number]\n    action: {type: collect, collect: [account_number], ask: {account_number: ask_account},"
        " prompt: address_update}").replace("  ask_day:", "  ask_account: What is your account number?\n  ask_day:")
    policy = parse_policy(text)
    decisions, state = run([U("update_address", 0.95), DtmfDigit("123456#")], policy=policy)
    assert [(d.action, d.reason) for d in decisions[1:]] == [("collect", "slot_missing"), ("answer", "slot_filled")]
    assert decisions[-1].slots == {"account_number": "123456"} and state.dtmf_digits == "123456#"


@pytest.mark.parametrize("keys,amount", [("50#", 50), ("50*25#", 50.25), ("7*5", 7.5)])
def test_amount_from_the_keypad(keys: str, amount: float) -> None:
    """"How much would you like to pay?" answered on the keypad: whole dollars, the star as decimal point;
    the value is read back like a spoken one."""
    decisions, _ = run([U("pay_bill", 0.95), DtmfDigit(keys)])
    assert (decisions[-1].action, decisions[-1].reason) == ("confirm", "read_back")
    assert decisions[-1].slots == {"amount": amount}


@pytest.mark.parametrize("keys", ["0#", "5**5#", "1*234#"])
def test_keypad_amount_that_is_none_is_not_taken(keys: str) -> None:
    d = run([U("pay_bill", 0.95), DtmfDigit(keys)])[0][-1]
    assert d.reason != "slot_filled" and "amount" not in d.slots


def test_queue_closed_announces_the_queue_the_caller_reaches() -> None:
    """Billing closed at 08:30 sends a dispute on to general: the caller must not hear "our billing team"."""
    d = run([U("billing_dispute", 0.95)], EARLY)[0][-1]
    assert (d.action, d.reason, d.target) == ("transfer", "out_of_hours", "general")
    assert d.prompt == POLICY.prompts["transfer"] and "billing" not in d.prompt
    assert run([U("billing_dispute", 0.95)], OPEN)[0][-1].prompt == POLICY.prompts["billing_transfer"]
    # the closed queue's out-of-hours prompt, when the admin wrote one, is what the caller hears
    text = POLICY_TEXT.replace("out_of_hours: {action: queue, queue: general}",
                               "out_of_hours: {action: queue, queue: general, prompt: callback_declined}", 1)
    d = run([U("billing_dispute", 0.95)], EARLY, policy=parse_policy(text))[0][-1]
    assert d.target == "general" and d.prompt == POLICY.prompts["callback_declined"]
    # a reason-bound rule keeps its prompt when rerouted (an agent request is still an agent request)
    text = POLICY_TEXT.replace("agent_request: {intent: speak_to_agent, queue: general",
                               "agent_request: {intent: speak_to_agent, queue: billing", 1)
    d = run([U("speak_to_agent", 0.9)], EARLY, policy=parse_policy(text))[0][-1]
    assert d.target == "general" and d.prompt == POLICY.prompts["agent_transfer"]


def test_a_question_asked_again_gets_one_apology_not_one_per_try() -> None:
    """Three unclear answers to a read-back: "Sorry, I didn't get that." once before the question each time,
    never piled up ("Sorry... Sorry... Sorry... That's a payment of 40 dollars")."""
    decisions, _ = run([U("pay_bill", 0.95, slots={"amount": 40})] + [U("affirm", 0.3)] * 2 + [NoInput()])
    sorry, still = POLICY.prompts["slot_retry"], POLICY.prompts["still_there"]
    question = decisions[1].prompt
    assert decisions[2].prompt == f"{sorry} {question}" and decisions[3].prompt == f"{sorry} {question}"
    assert decisions[4].prompt == f"{still} {question}"


def test_no_fifty_not_fifteen_reads_back_fifty() -> None:
    """The caller names the right value and the wrong one; the wrong one is what was read back."""
    for heard in ([50, 15], [15, 50], [15.0, 50.0, 15.0]):
        decisions, _ = run([U("pay_bill", 0.95, slots={"amount": 15}),
                            U(None, 0.9, slot_candidates={"amount": heard})])
        assert decisions[-1].reason == "read_back" and decisions[-1].slots == {"amount": 50}, heard
        assert "50" in decisions[-1].prompt and "15" not in decisions[-1].prompt
    # then "yes" pays the corrected amount
    decisions, _ = run([U("pay_bill", 0.95, slots={"amount": 15}),
                        U("deny", 0.9, slot_candidates={"amount": [50, 15]}), YES])
    assert (decisions[-1].reason, decisions[-1].slots) == ("confirmed", {"amount": 50})
    # "no, forty dollars, not fifteen": the engine's one value and the candidates agree
    decisions, _ = run([U("pay_bill", 0.95, slots={"amount": 15}),
                        U("deny", 0.9, slots={"amount": 40}, slot_candidates={"amount": [40, 15]})])
    assert decisions[-1].slots == {"amount": 40}
    # two new values and no word on which: asked again; candidates of a slot the request does not collect: nothing
    decisions, _ = run([U("pay_bill", 0.95, slots={"amount": 15}),
                        U("deny", 0.9, slots={"amount": 40}, slot_candidates={"amount": [40, 50]})])
    assert decisions[-1].reason == "value_denied"
    decisions, _ = run([U("pay_bill", 0.95, slots={"amount": 15}),
                        U("deny", 0.9, slot_candidates={"day": ["monday", "friday"]})])
    assert decisions[-1].reason == "value_denied"
    # days too: "no, Tuesday, not Thursday" (the engine's day is the last one said: Thursday)
    decisions, _ = run([U("schedule_technician", 0.95, slots={"day": "thursday"}),
                        U("deny", 0.9, slots={"day": "thursday"}, slot_candidates={"day": ["tuesday", "thursday"]})])
    assert (decisions[-1].reason, decisions[-1].slots) == ("read_back", {"day": "tuesday"})
    # "yes, Tuesday, not Thursday" to "Tuesday, right?" is a yes, not a new day
    decisions, _ = run([U("schedule_technician", 0.95, slots={"day": "tuesday"}),
                        U("affirm", 0.9, slots={"day": "thursday"}, slot_candidates={"day": ["tuesday", "thursday"]})])
    assert (decisions[-1].reason, decisions[-1].slots) == ("confirmed", {"day": "tuesday"})
