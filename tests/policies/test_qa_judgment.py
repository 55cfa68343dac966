"""QA of the policy's judgment as a caller hears it (2026-12-01): each table row is a dialogue that used to go
wrong, or one a caller would notice if it did: "yes" to "Anything else?", changing one's mind, correcting a
read-back by voice or keypad, "say that again" at every step, goodbye or silence mid-flow, closed escalation
targets, and the zone of "we open at 8:30"."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.conversation_policy import CallPolicy
from engine.types import Understanding
from policies.decide import (FAILURE_REASONS, CallStart, CallState, DtmfDigit, Input, NoInput, is_failure, say_opening,
                             say_zone, step)
from policies.decision import Decision
from policies.schema import Policy, load_policy
from tests.helpers.bot import open_policy
from tests.helpers.dialogue_inputs import caller_inputs, play

POLICY = load_policy()
UTC = dt.timezone.utc
OPEN = dt.datetime(2026, 11, 23, 15, 0, tzinfo=UTC)  # Monday 10:00 New York: every queue open
NIGHT = dt.datetime(2026, 11, 24, 3, 0, tzinfo=UTC)  # Monday 22:00 New York: general closed, callback offered
K = POLICY.escalation.max_failures.max_stalled_turns


def U(intent: str | None, conf: float = 0.95, alts: list[tuple[str | None, float]] | None = None,
      **kw: Any) -> Understanding:
    return Understanding(intent=intent, confidence=conf, alternatives=alts or [(intent, conf)], **kw)


YES, NO, AGAIN, BYE = U("affirm"), U("deny"), U("repeat"), U("goodbye")
LOW = U(None, 0.1)
PAY15 = U("pay_bill", slots={"amount": 15.0})


def run(inputs: list[Input], now: dt.datetime = OPEN, policy: Policy = POLICY) -> tuple[list[Decision], CallState]:
    return play(policy, inputs, now)


def last(inputs: list[Input], now: dt.datetime = OPEN) -> Decision:
    return run(inputs, now)[0][-1]


# -- "Anything else?" -> "Yes" ----------------------------------------------------------------------------

SERVED = [
    [U("check_balance", 0.97)],
    [U("report_outage", 0.7), YES],  # confirmed first
    [PAY15, YES],  # a read-back confirmed: "... Anything else I can help with?"
    [U("schedule_technician", slots={"day": "friday"}), YES],
    [LOW, LOW, DtmfDigit("2")],  # the keypad menu after failures
    [U("check_balance", 0.97), AGAIN],  # the answer said again
]


@pytest.mark.parametrize("served", SERVED)
def test_yes_to_anything_else_asks_what_else_without_a_failed_turn(served: list[Input]) -> None:
    ds, state = run([*served, YES])
    d = ds[-1]
    assert (d.action, d.reason) == ("answer", "anything_else")
    assert d.prompt == POLICY.prompts["anything_else"]
    assert state.failures == 0 and not state.ended
    # the next request is served as a fresh one
    ds, state = run([*served, YES, U("reset_password", 0.97)])
    assert (ds[-1].action, ds[-1].reason, ds[-1].intent) == ("answer", "accepted", "reset_password")


def test_a_caller_with_many_requests_who_says_yes_each_time_is_never_escalated() -> None:
    turns: list[Input] = []
    for intent in ("check_balance", "report_outage", "reset_password", "update_address", "check_balance"):
        turns += [U(intent, 0.97), YES]
    ds, state = run(turns)
    assert not any(d.action in ("transfer", "dtmf_menu") for d in ds), [(d.action, d.reason) for d in ds]
    assert state.failures == 0 and not state.ended


@pytest.mark.parametrize("then,expected", [
    ([NO], ("hangup", "goodbye")),  # "What else?" -> "No": done
    ([AGAIN, NO], ("hangup", "goodbye")),  # ... also after hearing it again
    ([YES], ("reprompt", "no_context")),  # a second bare yes answers nothing: no loop of "Sure. What else?"
    ([U("affirm", 0.5)], ("reprompt", "no_context")),  # an unsure yes is no yes
])
def test_after_what_else(then: list[Input], expected: tuple[str, str]) -> None:
    d = last([U("check_balance", 0.97), YES, *then])
    assert (d.action, d.reason) == expected


def test_unsure_yes_to_anything_else_is_not_taken() -> None:
    d = last([U("check_balance", 0.97), U("affirm", 0.5)])
    assert d.reason != "anything_else"


def test_anything_else_stays_out_of_the_clarification_ratio() -> None:
    """ops: voicebot:clarification_ratio counts action=~clarify|confirm|reprompt (not answer)."""
    d = last([U("check_balance", 0.97), YES])
    assert d.action not in ("clarify", "confirm", "reprompt") and d.reason not in FAILURE_REASONS


# -- changing one's mind -------------------------------------------------------------------------------

@pytest.mark.parametrize("before,said,expected", [
    # asked for an amount: "actually I want to cancel" heard clearly, under cancel's stricter accept (0.97)
    ([U("pay_bill")], U("cancel_service", 0.92), ("confirm", "confirm_requested", "cancel_service")),
    ([U("pay_bill")], U("cancel_service", 0.98), ("transfer", "sensitive_intent", "cancel_service")),
    ([U("pay_bill")], U("check_balance", 0.85), ("confirm", "confirm_requested", "check_balance")),
    ([U("schedule_technician")], U("report_outage", 0.97), ("answer", "accepted", "report_outage")),
    # at a read-back
    ([PAY15], U("cancel_service", 0.98), ("transfer", "sensitive_intent", "cancel_service")),
    ([PAY15], U("check_balance", 0.85), ("confirm", "confirm_requested", "check_balance")),
    # a mumble while a value is asked for is still the value asked again, not "you'd like to ...?"
    ([U("pay_bill")], U("check_balance", 0.3), ("collect", "slot_missing", "pay_bill")),
    # an unsure goodbye while a value is asked for (slow digits have been heard as one): the value asked again
    ([U("pay_bill")], U("goodbye", 0.85), ("collect", "slot_missing", "pay_bill")),
])
def test_changing_ones_mind_mid_flow(before: list[Input], said: Understanding, expected: tuple[str, str, str]) -> None:
    ds, state = run([*before, said])
    d = ds[-1]
    assert (d.action, d.reason, d.intent) == expected
    if expected[1] == "confirm_requested":
        assert state.failures == 0  # the caller was heard: no failed turn
        d = run([*before, said, YES])[0][-1]
        assert d.intent == said.intent and d.action in ("answer", "transfer", "collect")


# -- correcting a value at the read-back ------------------------------------------------------------------

@pytest.mark.parametrize("correction", [
    U("deny", slots={"amount": 50.0}),  # "no, fifty, not fifteen"
    U(None, 0.9, slots={"amount": 50.0}),  # "fifty"
    U("pay_bill", 0.9, slots={"amount": 50.0}),  # "I said pay fifty"
    U("affirm", slots={"amount": 50.0}),  # "yes, fifty" (heard as a yes)
    DtmfDigit("50#"),  # typed
    DtmfDigit("50"),  # typed, ended by the inter-digit pause
    DtmfDigit("5"),  # one key that is no menu option
])
def test_a_corrected_amount_is_read_back_not_paid(correction: Input) -> None:
    ds, state = run([PAY15, correction])
    d = ds[-1]
    amount = 5.0 if correction == DtmfDigit("5") else 50.0
    assert (d.action, d.reason, dict(d.slots)) == ("confirm", "read_back", {"amount": amount})
    assert state.pending_confirm is not None and state.pending_confirm.read_back
    d = run([PAY15, correction, YES])[0][-1]
    assert (d.action, d.reason, dict(d.slots)) == ("answer", "confirmed", {"amount": amount})


def test_keys_at_a_read_back_are_an_answer_being_typed(tmp_path: Path) -> None:
    """The conversation acts on a lone menu key at once; at an amount's read-back "1" may begin "15#"."""
    cp = CallPolicy(load_policy(open_policy(tmp_path / "policy.yaml")), "1")
    cp.greeting()
    assert cp.dtmf_complete("1")  # nothing pending: menu key 1 is acted on at once
    cp.on_turn(PAY15)
    assert not cp.dtmf_complete("1")  # the read-back of 15 dollars: wait for '#' or the pause
    d = cp.on_dtmf("15#")
    assert (d.action, d.reason, dict(d.slots)) == ("confirm", "read_back", {"amount": 15.0})
    cp.on_turn(U("schedule_technician", slots={"day": "friday"}))
    assert cp.dtmf_complete("1")  # a day has no keypad form: the key is the menu's


# -- "say that again" at every step ------------------------------------------------------------------------

STEPS: list[tuple[str, list[Input], dt.datetime]] = [
    ("greeting", [], OPEN),
    ("an answer", [U("check_balance", 0.97)], OPEN),
    ("a confirmation", [U("report_outage", 0.7)], OPEN),
    ("an either-or question", [U("pay_bill", 0.45, [("pay_bill", 0.45), ("check_balance", 0.4)])], OPEN),
    ("a slot question", [U("pay_bill")], OPEN),
    ("a slot question re-asked", [U("pay_bill"), LOW], OPEN),
    ("a read-back", [PAY15], OPEN),
    ("a reprompt", [LOW], OPEN),
    ("the keypad menu", [LOW, LOW], OPEN),
    ("a callback offer", [U("speak_to_agent")], NIGHT),
    ("what else", [U("check_balance", 0.97), YES], OPEN),
]


@pytest.mark.parametrize("name,before,now", STEPS, ids=[s[0] for s in STEPS])
def test_repeat_says_the_last_prompt_and_never_counts_as_a_failure(name: str, before: list[Input],
                                                                   now: dt.datetime) -> None:
    ds, state = run(before, now)
    prev = ds[-1]
    d, after = step(POLICY, state, AGAIN)
    assert d.prompt == prev.prompt and d.reason == "repeat" and d.action == prev.action
    assert after.failures == state.failures, name
    assert after.pending_confirm == state.pending_confirm and after.pending_collect == state.pending_collect
    # asked again and again: the call still ends (a person or a goodbye) within the stall bound
    for _ in range(K + 1):
        if after.ended:
            break
        d, after = step(POLICY, after, AGAIN)
    assert after.ended and d.action in ("transfer", "hangup") and d.prompt


def test_repeats_do_not_bring_the_failure_escalation_closer() -> None:
    """Two "say that again" at a slot question, then two unclear amounts: still asked again, not transferred."""
    ds, state = run([U("pay_bill"), AGAIN, AGAIN, LOW, LOW])
    assert (ds[-1].action, ds[-1].reason) == ("collect", "slot_missing")
    assert state.failures == 2


# -- goodbye, silence and keys mid-flow ----------------------------------------------------------------------

@pytest.mark.parametrize("before", [[U("pay_bill")], [PAY15], [U("report_outage", 0.7)],
                                    [U("pay_bill", 0.45, [("pay_bill", 0.45), ("check_balance", 0.4)])]])
def test_goodbye_mid_flow_ends_the_call(before: list[Input]) -> None:
    d = last([*before, BYE])
    assert (d.action, d.reason) == ("hangup", "goodbye")


def test_silence_after_a_read_back_asks_it_again_then_lets_go() -> None:
    ds, state = run([PAY15, NoInput()])
    assert (ds[-1].action, ds[-1].reason) == ("confirm", "no_input")
    assert ds[-1].prompt.endswith("That's a payment of 15 dollars, is that right?")
    assert ds[-1].prompt.startswith(POLICY.prompts["still_there"])
    d = last([PAY15, NoInput(), YES])  # the answer after the silence still pays
    assert (d.reason, dict(d.slots)) == ("confirmed", {"amount": 15.0})
    d = last([PAY15, NoInput(), NoInput()])
    assert d.action == "hangup" and d.reason == "no_input"


@pytest.mark.parametrize("before,key,expected", [
    ([U("report_outage", 0.7)], "2", ("answer", "dtmf_selection", "check_balance")),  # a menu key chooses
    ([U("pay_bill", 0.45, [("pay_bill", 0.45), ("check_balance", 0.4)])], "1", ("collect", "slot_missing", "pay_bill")),
    ([U("pay_bill")], "40#", ("confirm", "read_back", "pay_bill")),  # the asked-for amount, typed
    ([U("pay_bill", 0.7)], "40#", ("confirm", "read_back", "pay_bill")),  # "pay your bill?" -> yes, and that much
    ([U("pay_bill", 0.7)], "4", ("collect", "slot_missing", "schedule_technician")),  # a menu key alone is one
    ([U("report_outage", 0.7)], "40#", ("dtmf_menu", "dtmf_invalid", None)),  # nothing there to type
    ([U("report_outage", 0.7)], "0", ("transfer", "agent_requested", "speak_to_agent")),
])
def test_keys_pressed_during_a_spoken_question(before: list[Input], key: str, expected: tuple[str, str, str]) -> None:
    d = last([*before, DtmfDigit(key)])
    assert (d.action, d.reason, d.intent) == expected


# -- frustration and closed escalation targets ---------------------------------------------------------------

def test_frustration_rising_across_turns_reaches_a_person_when_it_crosses_the_threshold() -> None:
    turns = [U(None, 0.1, caller_state={"frustration": f}) for f in (0.2, 0.5)]
    ds, _ = run([*turns, U("check_balance", 0.97, caller_state={"frustration": 0.8})])
    assert (ds[-1].action, ds[-1].reason, ds[-1].style) == ("transfer", "frustration", "calm")


@pytest.mark.parametrize("answer,expected", [
    (U("affirm", caller_state={"frustration": 0.9}), ("answer", "confirmed", {"amount": 15.0})),  # done: paid
    (U("deny", caller_state={"frustration": 0.9}), ("transfer", "frustration", {})),  # not settled: a person
    (U("affirm", slots={"amount": 50.0}, caller_state={"frustration": 0.9}), ("transfer", "frustration", {})),
    (U("affirm", 0.5, caller_state={"frustration": 0.9}), ("transfer", "frustration", {})),
])
def test_a_frustrated_yes_to_a_read_back_completes_it(answer: Understanding,
                                                      expected: tuple[str, str, dict[str, float]]) -> None:
    d = last([PAY15, answer])
    assert (d.action, d.reason, dict(d.slots)) == expected


@pytest.mark.parametrize("inputs", [
    [U(None, 0.1, caller_state={"frustration": 0.9})],  # frustration
    [LOW, LOW, LOW, LOW],  # max failures
    [U("speak_to_agent")],  # an agent
    [U("cancel_service", 0.98)],  # retention closed -> general closed
])
def test_an_escalation_to_a_closed_queue_offers_one_callback_then_ends(inputs: list[Input]) -> None:
    d = last(inputs, NIGHT)
    assert (d.action, d.reason, d.target) == ("confirm", "out_of_hours", "general")
    assert "tomorrow at 8 a.m. Eastern time" in d.prompt
    for more, end in ((YES, ("hangup", "callback")), (NO, ("hangup", "goodbye"))):
        d = last([*inputs, more], NIGHT)
        assert (d.action, d.reason) == end, more
    # mumbles: the offer is asked again at most until the stall bound, then a goodbye; never a dead transfer
    ds, state = run([*inputs, *[LOW] * K], NIGHT)
    assert state.ended and ds[-1].action == "hangup" and ds[-1].prompt
    assert not any(d.action == "transfer" for d in ds)


# -- the zone in "we open at ..." ----------------------------------------------------------------------------

ZONES = [
    # zone, local opening (winter / summer both: the name holds across DST), expected name
    ("America/New_York", "Eastern time"), ("America/Chicago", "Central time"), ("America/Denver", "Mountain time"),
    ("America/Los_Angeles", "Pacific time"), ("America/Phoenix", "Arizona time"), ("America/Anchorage", "Alaska time"),
    ("Pacific/Honolulu", "Hawaii time"), ("America/Halifax", "Atlantic time"), ("Europe/London", "UK time"),
    ("Europe/Dublin", "Irish time"), ("Europe/Paris", "Central European time"), ("Asia/Kolkata", "India time"),
    ("Australia/Sydney", "Australian Eastern time"), ("Asia/Dubai", "Dubai time"), ("UTC", "UTC"),
    ("America/Argentina/Buenos_Aires", "Buenos Aires time"), ("Etc/GMT+5", "UTC minus 5"),
    ("Asia/Taipei", "Taipei time"), ("America/Havana", "Cuba time"),  # "CST" there is not US Central time
    ("Asia/Kathmandu", "Kathmandu time"), ("Etc/GMT-14", "UTC plus 14"),
]


@pytest.mark.parametrize("zone,name", ZONES)
@pytest.mark.parametrize("month", [1, 7])
def test_the_zone_is_named_the_same_in_winter_and_summer(zone: str, name: str, month: int) -> None:
    opens = dt.datetime(2026, month, 6, 8, 30, tzinfo=ZoneInfo(zone))
    assert say_zone(opens) == name
    assert say_opening(opens, opens - dt.timedelta(hours=2)) == f"today at 8:30 a.m. {name}"


def test_opening_across_the_dst_change_is_the_local_clock_with_its_zone() -> None:
    """Saturday night before spring-forward (New York): Monday 8 a.m. EDT, said as Eastern time."""
    h = POLICY.queues["general"].hours
    assert h is not None
    now = dt.datetime(2026, 3, 8, 2, 0, tzinfo=UTC)  # Sat 21:00 EST
    nxt = h.next_opening(now)
    assert nxt is not None and nxt.tzname() == "EDT"
    assert say_opening(nxt, now) == "on Monday at 8 a.m. Eastern time"


def test_the_callback_offer_names_the_zone() -> None:
    d = last([U("speak_to_agent")], NIGHT)
    assert d.prompt.endswith("when we open tomorrow at 8 a.m. Eastern time?")


# -- property: whatever the caller does, "say that again" is never a failed turn --------------------------------

INTENTS = [*POLICY.intents, "not_in_catalog", None]


@settings(max_examples=150, deadline=None)
@given(seq=st.lists(st.one_of(caller_inputs(INTENTS), st.just(AGAIN)), min_size=1, max_size=30),
       now=st.sampled_from([OPEN, NIGHT]))
def test_repeat_is_never_a_failed_turn_and_every_call_ends(seq: list[Input], now: dt.datetime) -> None:
    _, state = step(POLICY, CallState(now=now), CallStart())
    since_outcome = 0
    for inp in seq:
        d, nxt = step(POLICY, state, inp)
        if d.reason == "repeat":
            assert not is_failure(state, d) and nxt.failures <= state.failures
            assert state.last is not None and d.prompt == state.last.prompt
        since_outcome = 0 if d.action in ("answer", "transfer", "hangup") and d.reason != "repeat" else since_outcome + 1
        assert since_outcome < K
        state = nxt
        if state.ended:
            break


# -- simulation scripts: slot values the engine could never give are refused, not read back ----------------------

@pytest.mark.parametrize("understanding,fragment", [
    ("{intent: pay_bill, confidence: 0.9, slots: {amount: forty}}", "slot 'amount' (money)"),
    ("{intent: pay_bill, confidence: 0.9, slots: {amount: -5}}", "slot 'amount' (money)"),
    ("{intent: pay_bill, confidence: 0.9, slots: {amount: .nan}}", "slot 'amount' (money)"),
    ("{intent: pay_bill, confidence: 0.9, slots: {amount: yes}}", "slot 'amount' (money)"),
    ("{intent: pay_bill, confidence: 0.9, slots: {amount: }}", "slot 'amount' (money)"),
    ("{intent: schedule_technician, confidence: 0.9, slots: {day: 5}}", "slot 'day' (day)"),
    ("{intent: schedule_technician, confidence: 0.9, slots: {day: {a: 1}}}", "slot 'day' (day)"),
    ("{intent: schedule_technician, confidence: 0.9, slots: {day: someday}}", "slot 'day' (day)"),
    ("{intent: null, confidence: 0.9, slots: {account_number: 12ab}}", "slot 'account_number' (digits)"),
    ("{intent: pay_bill, confidence: 0.9, slots: {amonut: 40}}", "unknown slot 'amonut'"),
    ("null", "understanding must be a mapping"),
    ("[pay_bill, 0.9]", "understanding must be a mapping"),
])
def test_a_script_slot_value_the_engine_never_gives_is_a_script_error(tmp_path: Path, understanding: str,
                                                                      fragment: str) -> None:
    from policies.simulate import ScriptError, simulate

    script = yaml.safe_load(f"now: 2026-11-23T15:00:00Z\nturns:\n  - understanding: {understanding}\n")
    script = {"now": script["now"], "dialogues": [{"turns": script["turns"]}]}
    with pytest.raises(ScriptError) as err:
        simulate(POLICY, script, tmp_path, lambda: None)
    assert "turns[0]" in str(err.value) and fragment in str(err.value), str(err.value)


@pytest.mark.parametrize("slots", ["{amount: 40}", "{amount: 12.5}", "{day: Friday}", "{day: tomorrow}",
                                   "{account_number: '0042'}"])
def test_script_slot_values_the_engine_gives_are_taken(tmp_path: Path, slots: str) -> None:
    from policies.simulate import simulate

    script = {"now": "2026-11-23T15:00:00Z", "dialogues": [{"turns": [
        {"understanding": yaml.safe_load(f"{{intent: null, confidence: 0.9, slots: {slots}}}")}]}]}
    assert simulate(POLICY, script, tmp_path, lambda: None)[0].steps[-1].reason == "no_context"
