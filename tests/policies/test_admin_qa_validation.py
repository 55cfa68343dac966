"""What an admin editing a policy gets back: every problem named once, at its line and field, for inputs
the validator used to wave through, misplace, or crash on."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from policies.schema import (MAX_ISSUES, MAX_POLICY_CHARS, PolicyError, PolicyIssue, load_policy, parse_policy,
                             validate_text)
from tests.helpers.policy_text import ACCEPT_LINE, DEFAULT_TEXT

TEXT = DEFAULT_TEXT


def line_of(text: str, needle: str) -> int:
    return text.count("\n", 0, text.index(needle)) + 1


def mutate(old: str, new: str, text: str = TEXT) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def errors_on(text: str, field: str) -> list[PolicyIssue]:
    errs = validate_text(text)
    assert errs, "expected the text to be refused"
    return [e for e in errs if e.field == field]


@pytest.mark.parametrize("word", ["yes", "on", "true", "no"])
def test_a_yaml_boolean_is_not_a_threshold(word: str) -> None:
    """`accept: yes` used to load as accept 1.0 (and `no` as 0.0): a threshold the admin never wrote."""
    text = mutate(ACCEPT_LINE, f"  accept: {word} ")
    (e,) = errors_on(text, "thresholds.accept")
    assert e.line == line_of(text, f"accept: {word}") and "not a number" in e.message
    text = mutate("{count: 4,", "{count: on,")
    assert errors_on(text, "escalation.max_failures.count")


def test_a_boolean_where_text_belongs_says_to_quote_it() -> None:
    text = mutate("  filler: One moment.", "  filler: no")
    (e,) = errors_on(text, "prompts.filler")
    assert "quotes" in e.message and e.line == line_of(text, "filler: no")


def test_every_bad_opening_span_is_its_own_error_at_its_line() -> None:
    """Only the first bad span of a queue was reported, at the `weekly:` line; overlaps passed."""
    text = mutate('tue: ["08:00-20:00"]', 'tue: ["25:00-26:00"]', mutate('mon: ["08:00-20:00"]', 'mon: ["20:00-08:00"]'))
    errs = validate_text(text)
    assert {e.field for e in errs} == {"queues.general.hours.weekly.mon.0", "queues.general.hours.weekly.tue.0"}
    assert all(not e.message.startswith("Value error") for e in errs)
    text = mutate('sat: ["09:00-17:00"]', 'sat: ["09:00-13:00", "12:00-17:00"]')
    (e,) = errors_on(text, "queues.general.hours.weekly.sat")
    assert "overlap" in e.message and e.line == line_of(text, "sat: [\"09:00-13:00\"")
    assert validate_text(mutate('sat: ["09:00-17:00"]', 'sat: ["09:00-12:00", "12:00-17:00"]')) == []  # touching is fine


@pytest.mark.parametrize("old,new,field,needle", [
    # a slot question is said as written: {balance} would reach the caller unfilled
    ("  ask_amount: How much would you like to pay?", "  ask_amount: How much of {balance} would you like to pay?",
     "intents.pay_bill.action.ask.amount", "ask: {amount: ask_amount}"),
    # an intent's confirm question is filled with that intent's slots only
    ("    label: check your balance\n", "    label: check your balance\n    confirm_prompt: confirm_payment\n",
     "intents.check_balance.confirm_prompt", "confirm_prompt: confirm_payment"),
    # transfer announcements get slot values, nothing else
    ("  agent_transfer: Sure, I'll connect you with an agent now.", "  agent_transfer: Sure {caller}, one moment.",
     "escalation.agent_request.prompt", "prompt: agent_transfer}"),
    # prompts decide() says exactly as written
    ("  reprompt: Sorry, I didn't catch that.", "  reprompt: Sorry {caller}, I didn't catch that.",
     "prompts.reprompt", "  reprompt: Sorry {caller}"),
    ("  callback_offer: Our agents", "  callback_offer: Our {amount} agents", "queues.general.out_of_hours.prompt",
     "{action: callback, prompt: callback_offer}"),
    ("  clarify: Would you like to {a}, or {b}?", "  clarify: Would you like to {a}, or {c}?", "prompts.clarify",
     "  clarify:"),
])
def test_placeholders_nothing_fills_are_refused_where_the_prompt_is_used(old: str, new: str, field: str,
                                                                          needle: str) -> None:
    text = mutate(old, new)
    hit = errors_on(text, field)
    assert len(hit) == 1, validate_text(text)
    assert hit[0].line == line_of(text, needle) and "uses [" in hit[0].message


def test_a_queue_needs_a_target_to_dial() -> None:
    text = mutate("    target: repair\n", "    target: '  '\n")
    (e,) = errors_on(text, "queues.repair.target")
    assert e.line == line_of(text, "target: '  '")


def test_a_date_that_does_not_exist_is_a_line_located_error_not_a_crash() -> None:
    text = mutate("      timezone: America/New_York\n", "      timezone: America/New_York\n      holidays: [2026-02-30]\n")
    (e,) = validate_text(text)
    assert e.line == line_of(text, "holidays: [2026-02-30]") and "not a date" in e.message


def test_characters_yaml_refuses_and_tabs_are_located(tmp_path: Path) -> None:
    text = mutate("  filler: One moment.", "  filler: One \x07moment.")
    (e,) = validate_text(text)
    assert e.line == line_of(text, "filler: One") and e.column == len("  filler: One ") + 1 and "U+0007" in e.message
    text = mutate(ACCEPT_LINE, "\taccept: 0.9 ")
    (e,) = validate_text(text)
    assert e.line == line_of(text, "\taccept") and "tabs" in e.message
    f = tmp_path / "latin1.yaml"
    f.write_bytes(mutate("  filler: One moment.", "  filler: Un moment caf\xe9.").encode("latin-1"))
    with pytest.raises(PolicyError) as info:
        load_policy(f)
    (e,) = info.value.errors
    assert e.line == line_of(TEXT, "  filler:") and "0xe9" in e.message and "UTF-8" in e.message
    assert str(f) in str(info.value)
    f.write_bytes(b"\xef\xbb\xbf" + TEXT.encode())  # a byte-order mark from a Windows editor is fine
    assert load_policy(f).name == "default"


def test_merge_keys_still_load() -> None:
    text = mutate("  repair:\n    target: repair\n", "  repair:\n    <<: {prompt: transfer, target: x}\n    target: repair\n")
    q = parse_policy(text).queues["repair"]
    assert (q.prompt, q.target) == ("transfer", "repair")  # the mapping's own key wins over the merged one


def test_an_alias_bomb_is_refused_quickly() -> None:
    """A few anchors referenced many times made the validator walk gigabytes (minutes of a parser thread)."""
    big = "x" * 100_000
    refs = "".join(f"  k{i}: *big\n" for i in range(200))
    text = mutate("prompts:\n", f"prompts:\n  k_: &big {big}\n{refs}")
    t0 = time.monotonic()
    (e,) = validate_text(text)
    assert "aliases" in e.message and e.line == 1
    assert time.monotonic() - t0 < 30  # generous for a loaded 2-core box; it used to take minutes at 5 MB


def test_huge_documents_and_error_floods_are_bounded() -> None:
    (e,) = validate_text("a: " + "x" * (MAX_POLICY_CHARS + 1))
    assert "at most" in e.message
    text = mutate("prompts:\n", "prompts:\n" + "".join(f"  p{i}: '...'\n" for i in range(MAX_ISSUES + 50)))
    errs = validate_text(text)
    assert len(errs) == MAX_ISSUES + 1 and "50 more problems" in errs[-1].message
    assert all(e.line for e in errs[:-1])


def test_an_unquoted_menu_key_says_to_quote_it() -> None:
    text = mutate('    "1": pay_bill', "    1: pay_bill")
    (e,) = validate_text(text)
    assert e.field == "dtmf.options.1" and e.line == line_of(text, "1: pay_bill") and '("1")' in e.message


def test_an_empty_value_says_so() -> None:
    text = mutate(ACCEPT_LINE, "  accept: ")
    (e,) = errors_on(text, "thresholds.accept")
    assert "empty" in e.message


def test_a_file_that_never_ends_is_refused() -> None:
    with pytest.raises(PolicyError, match="larger than"):
        load_policy("/dev/zero")


def test_cli_validate_names_the_line_for_what_used_to_be_a_traceback(tmp_path: Path) -> None:
    """`bot policy validate` printed a Python traceback for a date that does not exist and for deep nesting."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]

    def validate(text: str) -> dict:
        f = tmp_path / "p.yaml"
        f.write_text(text)
        p = subprocess.run([sys.executable, "-m", "bot.cli", "policy", "validate", str(f), "--json"], cwd=root,
                           capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
        return json.loads(p.stdout)["errors"]

    (e,) = validate(mutate("      timezone: America/New_York\n",
                           "      timezone: America/New_York\n      holidays: [2026-13-45]\n"))
    assert e["line"] == line_of(TEXT, "      timezone: America/New_York") + 1 and "not a date" in e["message"]
    (e,) = validate(TEXT + "deep: " + "[" * 2000 + "]" * 2000 + "\n")
    assert e["line"] == TEXT.count("\n") + 1 and "nested too deeply" in e["message"]
