"""QA of policy validation (2026-12-01): a type error in one part of a policy used to hide every cross-reference
check (unknown intents in rules, unreachable queues, missing prompts), so an admin fixed `accept: "high"`,
published again, and only then learned of the typo in the keypad menu. Now every problem is listed in one go,
each at its own line, and a type error alone brings no invented problems along."""

from __future__ import annotations

import pytest

from policies.schema import DEFAULT_POLICY_PATH, validate_text

TEXT = DEFAULT_POLICY_PATH.read_text()


def line_of(text: str, needle: str) -> int:
    return text.count("\n", 0, text.index(needle)) + 1


def edit(text: str, old: str, new: str) -> str:
    assert text.count(old) >= 1, old
    return text.replace(old, new, 1)


# type errors: (old, new, field reported, needle of its line)
TYPE_ERRORS = [
    ("  accept: 0.9 ", '  accept: "high" ', "thresholds.accept", 'accept: "high"'),
    ("{type: answer, prompt: balance}", "{type: anwser, prompt: balance}", "intents.check_balance.action.type",
     "{type: anwser"),
    ("out_of_hours: {action: callback, prompt: callback_offer}", "out_of_hours: {action: callme, prompt: callback_offer}",
     "queues.general.out_of_hours.action", "action: callme"),
    ("frustration: {threshold: 0.7", 'frustration: {threshold: "lots"', "escalation.frustration.threshold",
     'threshold: "lots"'),
    ("  balance: I can see", "  balance: yes\n  balance_text: I can see", "prompts.balance", "balance: yes"),
    ('"1": pay_bill', "1: pay_bill", "dtmf.options.1", "1: pay_bill"),
    ("- {intent: cancel_service, queue: retention, prompt: retention_transfer}",
     "- {intent: cancel_service, queue: [retention], prompt: retention_transfer}", "escalation.sensitive.0.queue",
     "queue: [retention]"),
    ("agent_request: {intent: speak_to_agent, queue: general, ", "agent_request: {intent: speak_to_agent, ",
     "escalation.agent_request.queue", "agent_request: {intent"),
    ("timezone: America/New_York", "timezone: America/NewYork", "queues.general.hours.timezone", "America/NewYork"),
    ("  max: 2 ", "  max: two ", "no_input.max", "max: two"),
    ("{type: collect, collect: [day]", "{type: collect, collect: day", "intents.schedule_technician.action.collect",
     "collect: day"),
    # lint-only errors (a lenient load would take `yes` as 1.0): not reported again as a band above accept
    ("  confirm: 0.2 ", "  confirm: yes ", "thresholds.confirm", "confirm: yes"),
    ("cancel_service: {accept: 0.97}", "cancel_service: {accept: on}", "thresholds.overrides.cancel_service.accept",
     "accept: on"),
]

# cross-reference errors elsewhere: (old, new, field, needle, message fragment)
CROSS_REFS = [
    ("- {intent: billing_dispute, queue: billing", "- {intent: billing_dispute, queue: bill", "escalation.sensitive.1.queue",
     "queue: bill,", "unreachable queue 'bill'"),
    ('"3": report_outage', '"3": report_outtage', "dtmf.options.3", "report_outtage", "unknown intent 'report_outtage'"),
    ("{type: answer, prompt: outage}", "{type: answer, prompt: outagee}", "intents.report_outage.action.prompt",
     "prompt: outagee", "missing prompt 'outagee'"),
    ("    speak_to_agent: {accept: 0.7", "    speak_to_agnt: {accept: 0.7", "thresholds.overrides.speak_to_agnt",
     "speak_to_agnt:", "unknown intent 'speak_to_agnt'"),
]


@pytest.mark.parametrize("old,new,field,needle", TYPE_ERRORS, ids=[t[2] for t in TYPE_ERRORS])
def test_a_type_error_alone_is_the_only_problem_listed(old: str, new: str, field: str, needle: str) -> None:
    text = edit(TEXT, old, new)
    errors = validate_text(text)
    assert [e.field for e in errors] == [field], [str(e) for e in errors]
    assert errors[0].line == line_of(text, needle)


@pytest.mark.parametrize("old,new,field,needle", TYPE_ERRORS, ids=[t[2] for t in TYPE_ERRORS])
@pytest.mark.parametrize("ref", CROSS_REFS, ids=[c[2] for c in CROSS_REFS])
def test_a_type_error_no_longer_hides_cross_reference_problems(old: str, new: str, field: str, needle: str,
                                                               ref: tuple[str, str, str, str, str]) -> None:
    r_old, r_new, r_field, r_needle, fragment = ref
    text = edit(edit(TEXT, r_old, r_new), old, new)
    errors = {e.field: e for e in validate_text(text)}
    assert set(errors) == {field, r_field}, [str(e) for e in errors.values()]
    assert errors[field].line == line_of(text, needle)
    assert errors[r_field].line == line_of(text, r_needle) and fragment in errors[r_field].message


def test_every_problem_at_once_in_one_document() -> None:
    text = TEXT
    for old, new, *_ in (TYPE_ERRORS[0], TYPE_ERRORS[1], TYPE_ERRORS[8], *CROSS_REFS):
        text = edit(text, old, new)
    fields = [e.field for e in validate_text(text)]
    assert sorted(fields) == sorted([TYPE_ERRORS[0][2], TYPE_ERRORS[1][2], TYPE_ERRORS[8][2], *(c[2] for c in CROSS_REFS)])


def test_a_band_compared_with_a_default_is_not_invented() -> None:
    """`accept: "high"` and `confirm: 0.95`: the band is not judged against a default accept the admin never
    wrote; once accept is a number the band is checked."""
    text = edit(edit(TEXT, "  accept: 0.9 ", '  accept: "high" '), "  confirm: 0.2 ", "  confirm: 0.95 ")
    assert [e.field for e in validate_text(text)] == ["thresholds.accept"]
    text = edit(edit(TEXT, "  accept: 0.9 ", "  accept: 0.9 "), "  confirm: 0.2 ", "  confirm: 0.95 ")
    assert [e.field for e in validate_text(text)] == ["thresholds.confirm"]


def test_a_whole_section_of_the_wrong_type_lists_what_it_can() -> None:
    start, end = TEXT.index("\nno_input:\n"), TEXT.index("\ndtmf:\n")
    text = TEXT[:start] + "\nno_input: 5\n" + TEXT[end:]  # an optional section: the rest is still checked
    text = edit(text, '"2": check_balance', '"2": check_balanse')
    assert {e.field for e in validate_text(text)} == {"no_input", "dtmf.options.2"}
    start, end = TEXT.index("\nescalation:\n"), TEXT.index("\nno_input:\n")
    text = TEXT[:start] + "\nescalation: 5\n" + TEXT[end:]  # a required one: every rule refers to it
    errors = validate_text(edit(text, '"2": check_balance', '"2": check_balanse'))
    assert [e.field for e in errors] == ["escalation"]
