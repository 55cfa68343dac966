"""QA of the policy's judgment, round 2 (2026-12-01): a caller who changes their mind in the middle of a
collection and then says "no" goes back to the interrupted question with its values; values said at a
read-back ("no, sixty", "yes, sixty"); goodbye, keys and two close intents in the middle of a collection; no
question asked more often than the policy's limits allow; every path ends within a bounded number of turns."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.conversation_policy import CallPolicy
from engine.types import Understanding
from policies.decide import REASONS, CallStart, CallState, DtmfDigit, Input, NoInput, is_failure, step
from policies.decision import Decision
from policies.schema import Policy, load_policy
from tests.helpers.bot import open_policy
from tests.helpers.dialogue_inputs import caller_inputs, play, sure_turns

POLICY = load_policy()
UTC = dt.timezone.utc
OPEN = dt.datetime(2026, 11, 23, 15, 0, tzinfo=UTC)  # Monday 10:00 New York: every queue open
NIGHT = dt.datetime(2026, 11, 24, 3, 0, tzinfo=UTC)  # Monday 22:00 New York: general closed, callback offered
K = POLICY.escalation.max_failures.max_stalled_turns
MAX_FAILURES = POLICY.escalation.max_failures.count


def U(intent: str | None, conf: float = 0.95, alts: list[tuple[str | None, float]] | None = None,
      **kw: Any) -> Understanding:
    return Understanding(intent=intent, confidence=conf, alternatives=alts or [(intent, conf)], **kw)


YES, NO, AGAIN, BYE = U("affirm"), U("deny"), U("repeat"), U("goodbye")
PAY = U("pay_bill")  # "I want to pay my bill": "How much would you like to pay?"
PAY15 = U("pay_bill", slots={"amount": 15.0})  # "That's a payment of 15 dollars, is that right?"
DAY = U("schedule_technician")  # "What day works best for the technician visit?"
CLOSE = U("check_balance", 0.5, [("check_balance", 0.5), ("report_outage", 0.45)])  # two intents heard close
ASK_AMOUNT = POLICY.prompts["ask_amount"]


def run(inputs: list[Input], now: dt.datetime = OPEN, policy: Policy = POLICY) -> tuple[list[Decision], CallState]:
    return play(policy, inputs, now)


def last(inputs: list[Input], now: dt.datetime = OPEN) -> Decision:
    return run(inputs, now)[0][-1]


# -- a changed mind, then "no": back to the interrupted question ------------------------------------------------

# (before, the other request, the interrupted question as (action, intent, slots, prompt))
RESUMES = [
    ([PAY], U("cancel_service", 0.92), ("collect", "pay_bill", {}, ASK_AMOUNT)),
    ([PAY], U("check_balance", 0.85), ("collect", "pay_bill", {}, ASK_AMOUNT)),
    ([PAY], U("speak_to_agent", 0.5), ("collect", "pay_bill", {}, ASK_AMOUNT)),  # "agent?" in its confirm band
    ([PAY, U(None, 0.1)], U("cancel_service", 0.92), ("collect", "pay_bill", {}, ASK_AMOUNT)),  # after a re-ask
    ([DAY], U("report_outage", 0.85), ("collect", "schedule_technician", {}, POLICY.prompts["ask_day"])),
    # at a read-back: the values are read back again, not dropped
    ([PAY15], U("check_balance", 0.85),
     ("confirm", "pay_bill", {"amount": 15.0}, "That's a payment of 15 dollars, is that right?")),
    ([PAY15], U("goodbye", 0.85),  # "You'd like to end the call?" - "No"
     ("confirm", "pay_bill", {"amount": 15.0}, "That's a payment of 15 dollars, is that right?")),
    ([PAY15], CLOSE,  # "Would you like to check your balance, or report an outage?" - "Neither"
     ("confirm", "pay_bill", {"amount": 15.0}, "That's a payment of 15 dollars, is that right?")),
]


@pytest.mark.parametrize("before,other,back", RESUMES)
def test_no_to_a_changed_mind_resumes_the_interrupted_question(before: list[Input], other: Understanding,
                                                               back: tuple[str, str, dict[str, float], str]) -> None:
    ds, state = run([*before, other])
    assert ds[-1].action in ("confirm", "clarify") and ds[-1].resume is not None
    failures = state.failures
    ds, state = run([*before, other, NO])
    d = ds[-1]
    assert (d.action, d.reason, d.intent, dict(d.slots), d.prompt) == (back[0], "resumed", *back[1:])
    assert state.failures == failures, "the caller answered the question: no failed turn"
    assert not is_failure(run([*before, other])[1], d)
    # the resumed question is the one pending: its answer completes the request
    if back[1] == "pay_bill":
        answer: Input = YES if back[0] == "confirm" else U(None, 0.9, slots={"amount": 40.0})
        d = last([*before, other, NO, answer])
        assert d.intent == "pay_bill" and d.reason in ("confirmed", "read_back"), d
        if back[0] == "confirm":
            assert (d.action, dict(d.slots)) == ("answer", {"amount": 15.0})


def test_the_reported_case_word_for_word() -> None:
    """'How much would you like to pay?' -> 'actually I want to cancel' -> 'You'd like to cancel your service,
    is that right?' -> 'no' -> 'How much would you like to pay?' (not 'What can I help you with?')."""
    ds, state = run([PAY, U("cancel_service", 0.92), NO])
    assert [d.prompt for d in ds[1:]] == [ASK_AMOUNT, "You'd like to cancel your service, is that right?", ASK_AMOUNT]
    assert state.failures == 0 and state.pending_collect is not None and state.pending_collect.intent == "pay_bill"


@pytest.mark.parametrize("before,other", [(b, o) for b, o, _ in RESUMES])
def test_yes_to_a_changed_mind_switches_and_drops_the_old_request(before: list[Input], other: Understanding) -> None:
    pick = YES if other is not CLOSE else U("check_balance", 0.9)  # "yes" to A-or-B picks neither: a pick
    ds, state = run([*before, other, pick])
    d = ds[-1]
    assert d.intent == other.intent and d.reason in ("confirmed", "clarified", "sensitive_intent", "agent_requested",
                                                     "goodbye"), d
    assert d.action in ("answer", "transfer", "hangup")
    assert state.interrupted is None and state.pending_collect is None
    if d.action == "answer":  # the old request is gone: a later "no" is no way back to it
        d = last([*before, other, pick, NO])
        assert d.intent != "pay_bill" or d.reason not in ("resumed", "read_back")


def test_say_that_again_and_silence_keep_the_way_back() -> None:
    d = last([PAY15, U("check_balance", 0.85), AGAIN, NoInput(), NO])
    assert (d.reason, dict(d.slots)) == ("resumed", {"amount": 15.0})


def test_a_chain_of_changed_minds_resumes_the_first_collection() -> None:
    d = last([PAY, U("check_balance", 0.85), U("report_outage", 0.85), NO])
    assert (d.action, d.reason, d.intent, d.prompt) == ("collect", "resumed", "pay_bill", ASK_AMOUNT)


@pytest.mark.parametrize("before,answer,expected", [
    # "No, sixty dollars" / "sixty" to "You'd like to check your balance?": the amount answers the interrupted question
    ([PAY], U("deny", slots={"amount": 60.0}), {"amount": 60.0}),
    ([PAY], U(None, 0.9, slots={"amount": 60.0}), {"amount": 60.0}),
    ([PAY15], U("deny", slots={"amount": 60.0}), {"amount": 60.0}),
    ([PAY], DtmfDigit("60#"), {"amount": 60.0}),  # typed
    ([PAY15], DtmfDigit("60#"), {"amount": 60.0}),
])
def test_a_value_said_to_the_changed_mind_question_answers_the_interrupted_one(
        before: list[Input], answer: Input, expected: dict[str, float]) -> None:
    d = last([*before, U("check_balance", 0.85), answer])
    assert (d.action, d.reason, d.intent, dict(d.slots)) == ("confirm", "read_back", "pay_bill", expected)
    d = last([*before, U("check_balance", 0.85), answer, YES])
    assert (d.action, d.reason, dict(d.slots)) == ("answer", "confirmed", expected)


@pytest.mark.parametrize("before,again,expected", [
    ([PAY15], U("pay_bill", 0.95), ("confirm", "resumed", {"amount": 15.0})),  # "no, I want to pay my bill"
    ([PAY15], U("pay_bill", 0.6, slots={"amount": 60.0}), ("confirm", "read_back", {"amount": 60.0})),
    ([PAY], U("pay_bill", 0.95), ("collect", "resumed", {})),
])
def test_the_interrupted_request_said_again_goes_back_to_it(before: list[Input], again: Understanding,
                                                            expected: tuple[str, str, dict[str, float]]) -> None:
    d = last([*before, U("check_balance", 0.85), again])
    assert (d.action, d.reason, d.intent, dict(d.slots)) == (expected[0], expected[1], "pay_bill", expected[2])


def test_a_simulation_script_shows_the_way_back(tmp_path: Path) -> None:
    from policies.simulate import simulate

    script = {"now": "2026-11-23T15:00:00Z", "dialogues": [{"name": "changed mind", "turns": [
        {"understanding": {"intent": "pay_bill", "confidence": 0.95}},
        {"say": "actually I want to cancel", "understanding": {"intent": "cancel_service", "confidence": 0.92}},
        {"understanding": {"intent": "deny", "confidence": 0.95}},
        {"understanding": {"intent": None, "confidence": 0.9, "slots": {"amount": 40}}},
        {"understanding": {"intent": "affirm", "confidence": 0.95}},
    ], "expect": ["collect", "confirm/confirm_requested", "collect/resumed", "confirm/read_back", "answer/confirmed"]}]}
    result = simulate(POLICY, script, tmp_path, lambda: None)[0]
    assert result.ok, "\n".join(s.line() for s in result.steps)
    assert result.steps[3].prompt == ASK_AMOUNT


def test_ping_pong_between_two_requests_still_ends() -> None:
    ds, state = run([PAY, *[U("cancel_service", 0.92), NO] * K])
    assert state.ended and ds[-1].action in ("transfer", "hangup") and ds[-1].prompt
    assert len(ds) - 1 <= K + 1


def test_the_agent_gets_the_resumed_request_and_its_values(tmp_path: Path) -> None:
    cp = CallPolicy(load_policy(open_policy(tmp_path / "policy.yaml")), "1")
    cp.greeting()
    for u in (PAY15, U("check_balance", 0.85), NO):
        cp.on_turn(u)
    d = cp.on_turn(U("speak_to_agent", 0.95))
    ctx = cp.handoff_context(d)
    assert d.action == "transfer" and ctx["intent"] == "pay_bill" and ctx["slots"] == {"amount": 15.0}


def test_keys_typed_at_the_changed_mind_question_wait_for_the_whole_amount(tmp_path: Path) -> None:
    """'4' may begin '40#' (the amount the caller was asked for): the conversation must not act on menu key 4."""
    cp = CallPolicy(load_policy(open_policy(tmp_path / "policy.yaml")), "1")
    cp.greeting()
    cp.on_turn(PAY)
    cp.on_turn(U("check_balance", 0.85))
    assert not cp.dtmf_complete("4")
    d = cp.on_dtmf("40#")
    assert (d.action, d.reason, dict(d.slots)) == ("confirm", "read_back", {"amount": 40.0})


# -- values said at a read-back -----------------------------------------------------------------------------------

@pytest.mark.parametrize("before,answer,expected", [
    ([PAY15], U("deny", slots={"amount": 60.0}), {"amount": 60.0}),  # "no, sixty"
    ([PAY15], U("affirm", slots={"amount": 60.0}), {"amount": 60.0}),  # "yes, sixty": not a yes to 15
    ([PAY15], U("affirm", 0.85, slots={"amount": 60.0}), {"amount": 60.0}),
    ([PAY15], U("deny", 0.85, slots={"amount": 60.0}, caller_state={"frustration": 0.3}), {"amount": 60.0}),
    ([U("schedule_technician", slots={"day": "friday"})], U("deny", slots={"day": "monday"}), {"day": "monday"}),
    ([U("schedule_technician", slots={"day": "friday"})], U("affirm", slots={"day": "monday"}), {"day": "monday"}),
])
def test_a_new_value_at_a_read_back_is_read_back(before: list[Input], answer: Understanding,
                                                  expected: dict[str, Any]) -> None:
    ds, state = run([*before, answer])
    d = ds[-1]
    assert (d.action, d.reason, dict(d.slots)) == ("confirm", "read_back", expected)
    assert state.failures == 0
    # and only the caller's yes to the new value acts on it
    d = last([*before, answer, YES])
    assert (d.action, d.reason, dict(d.slots)) == ("answer", "confirmed", expected)


@pytest.mark.parametrize("conf", [0.25, 0.5, 0.7])
def test_the_request_restated_unsurely_at_a_read_back_does_not_pay(conf: float) -> None:
    """A mumble heard as pay_bill at 0.25 used to confirm "That's a payment of 15 dollars" and pay."""
    d = last([PAY15, U("pay_bill", conf, [("pay_bill", conf), ("check_balance", min(conf, 1 - conf) - 0.01)])])
    assert d.action == "confirm" and d.intent == "pay_bill" and dict(d.slots) == {"amount": 15.0}
    assert d.prompt.endswith("That's a payment of 15 dollars, is that right?")
    assert last([PAY15, U("pay_bill", 0.85)]).reason == "confirmed"  # as sure as a yes: it answers


# -- goodbye, keys, close intents in the middle of a collection ---------------------------------------------------

@pytest.mark.parametrize("before,unconfirmed", [
    ([PAY], False), ([DAY], False), ([PAY, U("cancel_service", 0.92)], False),
    # values read back and not yet confirmed: the caller hears that nothing was done
    ([PAY15], True), ([U("schedule_technician", slots={"day": "friday"})], True), ([PAY15, CLOSE], True),
    ([PAY15, U("check_balance", 0.85)], True), ([PAY15, AGAIN], True),
])
def test_a_clear_goodbye_mid_collection_ends_politely(before: list[Input], unconfirmed: bool) -> None:
    ds, state = run([*before, BYE])
    d = ds[-1]
    assert (d.action, d.reason, d.intent) == ("hangup", "goodbye", "goodbye") and state.ended
    key = "goodbye_unconfirmed" if unconfirmed else "goodbye"
    assert d.prompt == POLICY.prompts[key] and d.style == "neutral"


def test_an_unsure_goodbye_at_a_read_back_is_asked_about_and_yes_ends_without_paying() -> None:
    ds, _ = run([PAY15, U("goodbye", 0.85), YES])
    assert ds[-2].prompt == "You'd like to end the call, is that right?"
    assert (ds[-1].action, ds[-1].prompt) == ("hangup", POLICY.prompts["goodbye_unconfirmed"])
    assert "payment" not in ds[-1].prompt


def test_goodbye_after_the_payment_is_the_plain_goodbye() -> None:
    d = last([PAY15, YES, BYE])
    assert d.prompt == POLICY.prompts["goodbye"]


@pytest.mark.parametrize("before,key,expected", [
    ([U("report_outage", 0.7)], "3", ("answer", "dtmf_selection", "report_outage")),  # the key for what is asked
    ([U("report_outage", 0.7)], "9", ("dtmf_menu", "dtmf_invalid", None)),  # no option: the menu
    ([PAY, U("check_balance", 0.85)], "2", ("answer", "dtmf_selection", "check_balance")),  # a menu key chooses
    ([PAY15], "60#", ("confirm", "read_back", "pay_bill")),
    # the key for the request being read back: the read-back again, Friday kept (it used to ask the day again)
    ([U("schedule_technician", slots={"day": "friday"})], "4", ("confirm", "low_confidence", "schedule_technician")),
    ([U("schedule_technician", slots={"day": "friday"})], "2", ("answer", "dtmf_selection", "check_balance")),
])
def test_keys_during_a_confirm_question(before: list[Input], key: str, expected: tuple[str, str, str | None]) -> None:
    d = last([*before, DtmfDigit(key)])
    assert (d.action, d.reason, d.intent) == expected
    assert d.prompt


def test_a_menu_key_restarting_the_question_at_the_failure_limit_reaches_a_person() -> None:
    """'What day?' -> three answers that are no day -> key 4 (book a technician: the same question again) was a
    fourth failed turn that asked once more instead of escalating at max_failures.count."""
    wrong = U(None, 0.9, slots={"amount": 40.0})
    ds, state = run([DAY, *[wrong] * (MAX_FAILURES - 1), DtmfDigit("4")])
    assert (ds[-1].action, ds[-1].reason) == ("transfer", "max_failures")
    assert sum(d.action == "collect" for d in ds) == MAX_FAILURES


def test_the_key_for_the_request_being_read_back_keeps_its_values() -> None:
    """Key 1 (pay a bill) at "That's a payment of 15 dollars, is that right?" restarted the payment: the amount
    was dropped and asked for again. It is no yes either (money moves only on a yes): the read-back is asked again."""
    ds, state = run([PAY15, DtmfDigit("1")])
    d = ds[-1]
    assert (d.action, d.intent, dict(d.slots)) == ("confirm", "pay_bill", {"amount": 15.0})
    assert d.prompt == f"{POLICY.prompts['slot_retry']} That's a payment of 15 dollars, is that right?"
    assert state.pending_confirm is not None and state.pending_confirm.read_back
    assert last([PAY15, DtmfDigit("1"), YES]).reason == "confirmed"
    ds, state = run([PAY15, *[DtmfDigit("1")] * (K + 1)])  # pressed again and again: a person, within the bounds
    assert state.ended and ds[-1].action == "transfer" and len(ds) - 1 <= MAX_FAILURES + 1


@pytest.mark.parametrize("before,answer,expected", [
    ([U("pay_bill", 0.7)], U("affirm", slots={"amount": 60.0}), ("confirm", "read_back", {"amount": 60.0})),
    ([U("schedule_technician", 0.7)], U("affirm", slots={"day": "monday"}), ("confirm", "read_back", {"day": "monday"})),
    ([U("pay_bill", 0.7)], YES, ("collect", "slot_missing", {})),
])
def test_a_value_said_with_yes_to_you_would_like_to_is_kept(before: list[Input], answer: Understanding,
                                                             expected: tuple[str, str, dict[str, Any]]) -> None:
    """"You'd like to pay your bill, is that right?" -> "Yes, sixty dollars" asked "How much?" again."""
    d = last([*before, answer])
    assert (d.action, d.reason, dict(d.slots)) == expected


def test_two_close_intents_mid_collection_re_ask_the_value() -> None:
    """'How much?' -> a mumble between balance and outage: the amount is asked again (the question stands)."""
    d = last([PAY, CLOSE])
    assert (d.action, d.reason, d.intent, d.prompt) == ("collect", "slot_missing", "pay_bill",
                                                        f"{POLICY.prompts['slot_retry']} {ASK_AMOUNT}")


def test_two_close_intents_at_a_read_back_keep_the_payment_on_hold() -> None:
    ds, state = run([PAY15, CLOSE])
    assert ds[-1].action == "clarify" and state.interrupted is not None
    assert state.interrupted.intent == "pay_bill" and dict(state.interrupted.slots) == {"amount": 15.0}
    d = last([PAY15, CLOSE, U("report_outage", 0.9)])  # picks one: served, the payment is not made
    assert (d.action, d.reason, d.intent) == ("answer", "clarified", "report_outage")


# -- properties: bounded dialogues, no question asked too often, "no" always finds its way back ---------------------

INTENTS = [*POLICY.intents, "not_in_catalog", None]
TURNS = st.one_of(sure_turns(list(POLICY.intents)), caller_inputs(INTENTS))
# a dialogue in the middle of a collection, then a change of mind (any request, in any band), then anything
STARTS = [PAY, PAY15, DAY, U("schedule_technician", slots={"day": "friday"}), U("pay_bill", 0.7)]
CHANGE = st.builds(lambda i, c: U(i, c, [(i, c)]), st.sampled_from(list(POLICY.intents)),
                   st.sampled_from([0.5, 0.85, 0.92, 0.98]))
DIALOGUES = st.builds(lambda a, b, rest: [a, b, *rest], st.sampled_from(STARTS), st.one_of(CHANGE, TURNS),
                      st.lists(st.one_of(CHANGE, TURNS), max_size=30))


def _question(d: Decision) -> tuple[str, str | None, tuple[tuple[str, Any], ...]] | None:
    """What a question asks, whatever its opening ("Sorry, I didn't get that."): action, intent, values."""
    if d.action not in ("collect", "confirm", "clarify"):
        return None
    return d.action, d.intent, tuple(sorted(d.slots.items()))


@settings(max_examples=250, deadline=None)
@given(seq=st.one_of(DIALOGUES, st.lists(TURNS, min_size=1, max_size=40)), now=st.sampled_from([OPEN, NIGHT]))
def test_every_path_ends_and_no_question_is_asked_beyond_the_limits(seq: list[Input], now: dt.datetime) -> None:
    _, state = step(POLICY, CallState(now=now), CallStart())
    since_outcome, same, prev_q = 0, 0, None
    for inp in seq:
        d, nxt = step(POLICY, state, inp)
        assert d.reason in REASONS and d.prompt, (inp, d)
        assert nxt.failures < MAX_FAILURES or nxt.ended
        q = _question(d)
        if d.reason != "repeat":  # asked for by the caller
            same = same + 1 if q is not None and q == prev_q else 0
            prev_q = q
        # asked again without progress: a failed turn each time, so at most max_failures.count times in a row
        assert same < MAX_FAILURES, f"the same question {same + 1} times in a row: {d.prompt!r}"
        since_outcome = 0 if d.action in ("answer", "transfer", "hangup") and d.reason != "repeat" else since_outcome + 1
        assert since_outcome < K
        if d.reason == "resumed":
            assert state.interrupted is not None and d.intent == state.interrupted.intent
            assert nxt.failures == state.failures
        state = nxt
        if state.ended:
            assert d.action in ("transfer", "hangup")
            break


@settings(max_examples=200, deadline=None)
@given(seq=DIALOGUES)
def test_no_to_a_question_that_interrupted_a_collection_always_goes_back_to_it(seq: list[Input]) -> None:
    _, state = step(POLICY, CallState(now=OPEN), CallStart())
    for inp in seq:
        if state.ended:
            break
        if state.interrupted is not None and state.last is not None and state.last.action in ("confirm", "clarify"):
            back = state.interrupted
            d, after = step(POLICY, state, NO)
            if d.reason != "max_failures":  # the stall bound still holds
                assert (d.reason, d.intent, dict(d.slots)) == ("resumed", back.intent, dict(back.slots)), d
                assert after.failures == state.failures
                if back.read_back:
                    assert after.pending_confirm is not None and after.pending_confirm.read_back
                else:
                    assert after.pending_collect is not None and after.pending_collect.intent == back.intent
        _, state = step(POLICY, state, inp)


def test_keys_typed_at_a_confirm_wait_for_the_amount_and_answer_it(tmp_path: Path) -> None:
    """'You'd like to pay your bill, is that right?' -> 40#: a yes with the amount (read back next), not menu
    key 4 acted on at once (it booked a technician)."""
    cp = CallPolicy(load_policy(open_policy(tmp_path / "policy.yaml")), "1")
    cp.greeting()
    assert cp.on_turn(U("pay_bill", 0.7)).action == "confirm"
    assert not cp.dtmf_complete("4")
    d = cp.on_dtmf("40#")
    assert (d.action, d.reason, d.intent, dict(d.slots)) == ("confirm", "read_back", "pay_bill", {"amount": 40.0})
    d = cp.on_turn(U("affirm"))
    assert (d.action, d.reason, dict(d.slots)) == ("answer", "confirmed", {"amount": 40.0})
