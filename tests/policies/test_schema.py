"""Policy validation: every kind of bad policy is rejected with errors pointing at the YAML line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from policies.schema import DEFAULT_POLICY_PATH, PolicyError, json_schema, load_policy, parse_policy, validate_text
from tests.helpers.policy_text import ACCEPT, ACCEPT_LINE

TEXT = DEFAULT_POLICY_PATH.read_text()
SCHEMA_FILE = Path(__file__).resolve().parents[2] / "policies" / "policy.schema.json"


def line_of(text: str, needle: str) -> int:
    idx = text.index(needle)
    return text.count("\n", 0, idx) + 1


def mutate(old: str, new: str, count: int = 1) -> str:
    assert old in TEXT, old
    return TEXT.replace(old, new, count)


# name, replacement (old, new), expected field, needle whose line the error must point at, message fragment
CASES = [
    ("threshold above 1", (ACCEPT_LINE, "  accept: 1.5 "), "thresholds.accept", "accept: 1.5", "less than or equal to 1"),
    ("threshold below 0", ("  confirm: 0.2 ", "  confirm: -0.1 "), "thresholds.confirm", "confirm: -0.1", "greater than or equal to 0"),
    ("confirm band above accept", ("  confirm: 0.2 ", "  confirm: 0.99 "), "thresholds.confirm", "confirm: 0.99", "above accept"),
    ("override band above accept", ("cancel_service: {accept: 0.97}", "cancel_service: {accept: 0.6, confirm: 0.7}"),
     "thresholds.overrides.cancel_service.confirm", "cancel_service: {accept: 0.6", "above accept"),
    ("unknown intent in a rule", ("- {intent: cancel_service, queue: retention", "- {intent: cancel_account, queue: retention"),
     "escalation.sensitive.0.intent", "- {intent: cancel_account", "unknown intent 'cancel_account'"),
    ("unknown intent in an override", ("    speak_to_agent: {accept: 0.7", "    speak_to_agnt: {accept: 0.7"),
     "thresholds.overrides.speak_to_agnt", "speak_to_agnt:", "unknown intent"),
    ("unknown intent in the keypad menu", ('"2": check_balance', '"2": check_balanse'), "dtmf.options.2", '"2": check_balanse',
     "unknown intent"),
    ("missing prompt for an action", ("{type: answer, prompt: balance}", "{type: answer, prompt: balanse}"),
     "intents.check_balance.action.prompt", "{type: answer, prompt: balanse}", "missing prompt 'balanse'"),
    ("missing required prompt", ("  goodbye: Thanks for calling. Goodbye.\n", ""), "prompts", "prompts:", "missing prompt 'goodbye'"),
    ("unreachable queue", ("{type: transfer, queue: billing}", "{type: transfer, queue: billng}"),
     "intents.billing_dispute.action.queue", "queue: billng}", "unreachable queue 'billng'"),
    ("unreachable escalation queue", ("frustration: {threshold: 0.7, queue: general", "frustration: {threshold: 0.7, queue: supervisors"),
     "escalation.frustration.queue", "frustration: {threshold", "unreachable queue 'supervisors'"),
    ("out-of-hours cycle", ("    out_of_hours: {action: callback, prompt: callback_offer}", "    out_of_hours: {action: queue, queue: billing}"),
     "queues.general.out_of_hours.queue", "out_of_hours: {action: queue, queue: billing}", "loops"),
    ("closed queue with no plan", ("    out_of_hours: {action: callback, prompt: callback_offer}\n", ""),
     "queues.general.hours", "    hours:", "out_of_hours"),
    ("bad timezone", ("timezone: America/New_York", "timezone: Mars/Olympus"), "queues.general.hours.timezone",
     "timezone: Mars/Olympus", "unknown timezone"),
    ("bad opening span", ('mon: ["08:00-20:00"]', 'mon: ["20:00-08:00"]'), "queues.general.hours.weekly.mon.0",
     "weekly: {mon", "opening span"),
    ("unknown action type", ("{type: answer, prompt: outage}", "{type: anwser, prompt: outage}"),
     "intents.report_outage.action.type", "{type: anwser", "Input should be"),
    ("unknown field", ("  ambiguity_margin: 0.1 ", "  ambiguity_margn: 0.1 "), "thresholds.ambiguity_margn",
     "ambiguity_margn", "unknown field"),
    ("missing action", ("    action: {type: answer, prompt: password_reset}\n", ""), "intents.reset_password.action",
     "  reset_password:", "required"),
    ("placeholder that is not a slot", ("  balance: I can see your account.", "  balance: Your balance is {amount}. I can see your account."),
     "intents.check_balance.action.prompt", "{type: answer, prompt: balance}", "not slots of 'check_balance'"),
    ("collect slot not on the intent", ("collect: [amount], ask: {amount: ask_amount}", "collect: [day], ask: {day: ask_amount}"),
     "intents.pay_bill.action.collect", "collect: [day]", "not one of this intent's slots"),
    ("read-back prompt missing", ("read_back: confirm_payment}", "read_back: confirm_paymnt}"),
     "intents.pay_bill.action.read_back", "read_back: confirm_paymnt}", "missing prompt 'confirm_paymnt'"),
    ("read-back on an intent that collects nothing", ("{type: answer, prompt: outage}", "{type: answer, prompt: outage, read_back: confirm_payment}"),
     "intents.report_outage.action.read_back", "prompt: outage, read_back", "collect only"),
    ("read-back placeholder that is not a slot", ("  confirm_payment: That's a payment of {amount} dollars",
                                                  "  confirm_payment: That's {amount} dollars on {day}"),
     "intents.pay_bill.action.read_back", "read_back: confirm_payment}", "not slots of 'pay_bill'"),
    ("keypad key not a digit", ('    "0": speak_to_agent', '    "00": speak_to_agent'), "dtmf.options", "  options:", "single keypad"),
    ("prompt with nothing to say", ("  filler: One moment.", '  filler: "..."'), "prompts.filler", 'filler: "..."',
     "nothing the voice can say"),
    ("prompt of emoji only", ("  still_there: Are you still there?", '  still_there: "\U0001F60A"'), "prompts.still_there",
     "still_there:", "nothing the voice can say"),
    ("prompt longer than the voice renders", ("  filler: One moment.", "  filler: " + "One moment please. " * 60),
     "prompts.filler", "  filler: One moment please.", "BOT_VOICE_MAX_CHARS"),
]


@pytest.mark.parametrize("name,rep,field,needle,fragment", CASES, ids=[c[0] for c in CASES])
def test_invalid_policy_points_at_line_and_field(name: str, rep: tuple[str, str], field: str, needle: str, fragment: str) -> None:
    text = mutate(*rep)
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source="test.yaml")
    errors = info.value.errors
    hit = [e for e in errors if e.field == field]
    assert hit, f"no error on {field}: {[str(e) for e in errors]}"
    assert hit[0].line == line_of(text, needle), str(hit[0])
    assert fragment in hit[0].message
    assert info.value.to_list()[0].keys() == {"line", "column", "field", "message"}
    assert "test.yaml" in str(info.value)


def test_invalid_yaml_points_at_line() -> None:
    text = mutate(ACCEPT_LINE, f"  accept: [{ACCEPT} ")
    errors = validate_text(text)
    assert len(errors) == 1 and errors[0].message.startswith("invalid YAML")
    assert errors[0].line is not None and abs(errors[0].line - line_of(text, f"accept: [{ACCEPT}")) <= 2


def test_not_a_mapping_and_unreadable_file(tmp_path: Path) -> None:
    assert validate_text("- just\n- a list\n")[0].message == "a policy must be a YAML mapping"
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(tmp_path / "missing.yaml")


def test_all_errors_reported_at_once() -> None:
    text = mutate(ACCEPT_LINE, "  accept: 0.1 ").replace("{type: transfer, queue: billing}", "{type: transfer, queue: nope}")
    fields = {e.field for e in validate_text(text)}
    assert {"thresholds.confirm", "intents.billing_dispute.action.queue"} <= fields


def test_default_policy_is_valid_and_loader_builds_new_objects() -> None:
    assert validate_text(TEXT) == []
    a, b = load_policy(), load_policy()
    assert a == b and a is not b and a.intents is not b.intents
    with pytest.raises(Exception):
        a.thresholds.accept = 0.1  # type: ignore[misc]  # frozen: a live policy cannot be edited in place


def test_catalog_for_the_engine() -> None:
    from engine.catalog import Catalog

    cat = Catalog.from_dict(load_policy().catalog_dict())
    assert "pay_bill" in cat.intent_names and cat.intent_slots["pay_bill"] == ["amount"]


def test_committed_json_schema_is_in_sync() -> None:
    committed = json.loads(SCHEMA_FILE.read_text())
    assert committed == json_schema(), "run: bot policy schema > policies/policy.schema.json"


def test_rejections_are_counted() -> None:
    from prometheus_client import REGISTRY

    labels = {"component": "policy", "kind": "invalid_policy"}
    before = REGISTRY.get_sample_value("voicebot_errors_total", labels) or 0.0
    assert validate_text("name: [unclosed\n")
    assert REGISTRY.get_sample_value("voicebot_errors_total", labels) == before + 1
