"""Business hours as admins write them and callers live them: DST days in three zones, spans over and up to
midnight, holidays in the queue's own zone, bad zones and spans at validation, the out-of-hours chains and
what the closed message says about when the team opens. Every time is an explicit datetime."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import yaml

from engine.types import Understanding
from policies.decide import CallStart, CallState, Input, say_opening, step
from policies.decision import Decision
from policies.schema import Hours, Policy, PolicyError, parse_policy
from tests.helpers.policy_text import DEFAULT_TEXT

UTC = dt.timezone.utc
DEFAULT = parse_policy(DEFAULT_TEXT)


def T(s: str) -> dt.datetime:
    """A UTC instant written as 'YYYY-MM-DD HH:MM[:SS]'."""
    return dt.datetime.fromisoformat(s).replace(tzinfo=UTC)


def hours(tz: str, **weekly: list[str]) -> Hours:
    return Hours.model_validate({"timezone": tz, "weekly": weekly})


# zone, day's spans, UTC instant, open? (what it is locally)
DST: list[tuple[str, dict[str, list[str]], str, bool]] = [
    # New York, spring forward 2026-03-08 02:00 EST -> 03:00 EDT: the span is open 01:30-02:00 only
    ("America/New_York", {"sun": ["01:30-02:30"]}, "2026-03-08 06:29", False),  # 01:29 EST
    ("America/New_York", {"sun": ["01:30-02:30"]}, "2026-03-08 06:45", True),  # 01:45 EST
    ("America/New_York", {"sun": ["01:30-02:30"]}, "2026-03-08 07:00", False),  # 03:00 EDT
    ("America/New_York", {"sun": ["02:00-04:00"]}, "2026-03-08 07:00", True),  # 03:00 EDT, inside 02-04
    # New York, fall back 2026-11-01 02:00 EDT -> 01:00 EST: 01:30-02:30 is open twice over
    ("America/New_York", {"sun": ["01:30-02:30"]}, "2026-11-01 05:45", True),  # 01:45 EDT
    ("America/New_York", {"sun": ["01:30-02:30"]}, "2026-11-01 06:15", False),  # 01:15 EST (repeat)
    ("America/New_York", {"sun": ["01:30-02:30"]}, "2026-11-01 06:45", True),  # 01:45 EST
    ("America/New_York", {"sun": ["01:30-02:30"]}, "2026-11-01 07:15", True),  # 02:15 EST
    ("America/New_York", {"sun": ["01:30-02:30"]}, "2026-11-01 07:30", False),  # 02:30 EST
    # London, spring forward 2026-03-29 01:00 GMT -> 02:00 BST
    ("Europe/London", {"sun": ["00:30-01:30"]}, "2026-03-29 00:45", True),  # 00:45 GMT
    ("Europe/London", {"sun": ["00:30-01:30"]}, "2026-03-29 01:10", False),  # 02:10 BST
    # London, fall back 2026-10-25 02:00 BST -> 01:00 GMT
    ("Europe/London", {"sun": ["01:00-02:00"]}, "2026-10-25 00:30", True),  # 01:30 BST
    ("Europe/London", {"sun": ["01:00-02:00"]}, "2026-10-25 01:30", True),  # 01:30 GMT
    ("Europe/London", {"sun": ["01:00-02:00"]}, "2026-10-25 02:00", False),  # 02:00 GMT
    # Sydney, spring forward 2026-10-04 02:00 AEST -> 03:00 AEDT: 02:00-03:00 never happens that day
    ("Australia/Sydney", {"sun": ["02:00-03:00"]}, "2026-10-03 15:59", False),  # 01:59 AEST
    ("Australia/Sydney", {"sun": ["02:00-03:00"]}, "2026-10-03 16:00", False),  # 03:00 AEDT
    # Sydney, fall back 2026-04-05 03:00 AEDT -> 02:00 AEST
    ("Australia/Sydney", {"sun": ["02:00-03:00"]}, "2026-04-04 15:30", True),  # 02:30 AEDT
    ("Australia/Sydney", {"sun": ["02:00-03:00"]}, "2026-04-04 16:30", True),  # 02:30 AEST
    ("Australia/Sydney", {"sun": ["02:00-03:00"]}, "2026-04-04 17:00", False),  # 03:00 AEST
]


@pytest.mark.parametrize("tz,weekly,when,expected", DST)
def test_spans_are_wall_clock_across_dst(tz: str, weekly: dict[str, list[str]], when: str, expected: bool) -> None:
    assert hours(tz, **weekly).is_open(T(when)) is expected


def test_a_naive_time_is_utc() -> None:
    h = hours("Europe/London", mon=["09:00-17:00"])
    assert h.is_open(dt.datetime(2026, 7, 6, 8, 30)) is True  # 09:30 BST
    assert h.is_open(dt.datetime(2026, 7, 6, 16, 30)) is False  # 17:30 BST


def test_holidays_are_dates_in_the_queues_zone() -> None:
    """A 13:30 UTC call on 24 December is already Christmas morning in Sydney; a 03:00 UTC call on
    26 December is still Christmas evening in New York."""
    syd = Hours.model_validate({"timezone": "Australia/Sydney", "holidays": ["2026-12-25"],
                                "weekly": {d: ["00:00-24:00"] for d in ("mon", "tue", "wed", "thu", "fri")}})
    assert syd.is_open(T("2026-12-24 12:30"))  # Thu 23:30 AEDT
    assert not syd.is_open(T("2026-12-24 13:30"))  # Fri 25th 00:30 AEDT
    ny = Hours.model_validate({"timezone": "America/New_York", "holidays": ["2026-12-25"],
                               "weekly": {d: ["00:00-24:00"] for d in ("thu", "fri", "sat")}})
    assert not ny.is_open(T("2026-12-26 03:00"))  # Fri 25th 22:00 EST
    assert ny.is_open(T("2026-12-26 05:30"))  # Sat 26th 00:30 EST


def test_a_span_over_midnight_is_refused_with_how_to_write_it() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(DEFAULT_TEXT.replace('sat: ["09:00-17:00"]', 'sat: ["22:00-06:00"]', 1))
    (err,) = info.value.errors
    assert err.field == "queues.general.hours.weekly.sat.0"
    assert "'22:00-24:00'" in err.message and "'00:00-06:00'" in err.message
    # written as the message says: open through the night
    h = hours("America/New_York", mon=["22:00-24:00"], tue=["00:00-06:00"])
    assert h.is_open(T("2026-11-24 04:30"))  # Mon 23:30 EST
    assert h.is_open(T("2026-11-24 10:59"))  # Tue 05:59
    assert not h.is_open(T("2026-11-24 11:00"))  # Tue 06:00


@pytest.mark.parametrize("span", ["00:00-24:00", "00:00-23:59"])
def test_a_span_to_the_end_of_the_day_has_no_last_minute_gap(span: str) -> None:
    h = hours("UTC", mon=[span])
    assert h.is_open(T("2026-11-23 23:59:30"))
    assert not h.is_open(T("2026-11-24 00:00:10"))  # Tuesday: not listed


def _errors(text: str) -> list[Any]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    return info.value.errors


@pytest.mark.parametrize("zone,fragment", [
    ("America", "unknown timezone 'America'"),  # a folder of zones: used to crash validation
    ("america/new_york", "did you mean 'America/New_York'"),
    ("'Europe/London '", "did you mean 'Europe/London'"),
    ("Mars/Olympus", "IANA zone name"),
    ("localtime", "not a place"),
    ("'../etc/passwd'", "unknown timezone"),
])
def test_bad_zones_get_a_clear_message(zone: str, fragment: str) -> None:
    errs = _errors(DEFAULT_TEXT.replace("timezone: America/New_York", f"timezone: {zone}", 1))
    assert [e.field for e in errs] == ["queues.general.hours.timezone"], [str(e) for e in errs]
    assert fragment in errs[0].message


ZONE_LINE = "      timezone: America/New_York\n"


@pytest.mark.parametrize("extra,field,fragment", [
    ("      holidays: [12-25]\n", "queues.general.hours.holidays.0", "once per year"),
    ('      holidays: ["2026-12-25", "Dec 26"]\n', "queues.general.hours.holidays.1", "YYYY-MM-DD"),
    ("      holidays: 2026-12-25\n", "queues.general.hours.holidays", "a list of dates"),
    ("      holidays: [2026-12-25 10:00:00]\n", "queues.general.hours.holidays.0", "a whole day"),
])
def test_bad_holidays_get_a_clear_message(extra: str, field: str, fragment: str) -> None:
    errs = _errors(DEFAULT_TEXT.replace(ZONE_LINE, ZONE_LINE + extra, 1))
    assert [e.field for e in errs] == [field], [str(e) for e in errs]
    assert fragment in errs[0].message


def test_a_day_written_as_one_span_not_a_list() -> None:
    errs = _errors(DEFAULT_TEXT.replace('sat: ["09:00-17:00"]', 'sat: "09:00-17:00"', 1))
    assert [e.field for e in errs] == ["queues.general.hours.weekly.sat"]
    assert "write ['09:00-17:00']" in errs[0].message


def test_a_holiday_at_midnight_is_still_a_day() -> None:
    h = Hours.model_validate({"timezone": "UTC", "weekly": {"fri": ["00:00-24:00"]},
                              "holidays": [dt.datetime(2026, 12, 25)]})
    assert h.holidays == [dt.date(2026, 12, 25)] and not h.is_open(T("2026-12-25 12:00"))


def test_a_queue_closed_all_week_is_allowed_and_always_closed() -> None:
    """`weekly: {}` is how an admin shuts a line for now (its out-of-hours plan answers every caller)."""
    week = ('      weekly: {mon: ["09:00-17:00"], tue: ["09:00-17:00"], wed: ["09:00-17:00"], thu: ["09:00-17:00"],\n'
            '               fri: ["09:00-17:00"]}\n')
    text = DEFAULT_TEXT.replace(week, "      weekly: {}\n", 1)
    assert text != DEFAULT_TEXT
    billing = parse_policy(text).queues["billing"].hours
    assert billing is not None
    assert not any(billing.is_open(T("2026-11-23 00:00") + dt.timedelta(hours=h)) for h in range(0, 24 * 7, 1))
    assert billing.next_opening(T("2026-11-23 12:00")) is None


# -- when the team opens -------------------------------------------------------------------------------

GENERAL = DEFAULT.queues["general"].hours  # New York: Mon-Fri 08:00-20:00, Sat 09:00-17:00
assert GENERAL is not None


# hours, UTC instant, spoken next opening
OPENS: list[tuple[Hours, str, str]] = [
    (GENERAL, "2026-11-24 03:00", "tomorrow at 8 a.m. Eastern time"),  # Mon 22:00 EST
    (GENERAL, "2026-11-23 12:00", "today at 8 a.m. Eastern time"),  # Mon 07:00 EST
    (GENERAL, "2026-11-28 23:00", "on Monday at 8 a.m. Eastern time"),  # Sat 18:00 EST
    (GENERAL, "2026-11-27 01:30", "tomorrow at 8 a.m. Eastern time"),  # Thu 20:30 EST (UTC says Friday)
    (hours("Europe/London", mon=["08:30-17:00"]), "2026-11-23 07:00", "today at 8:30 a.m. UK time"),
    (hours("Europe/London", tue=["13:00-17:00"]), "2026-11-23 07:00", "tomorrow at 1 p.m. UK time"),
    (hours("UTC", mon=["12:00-13:00"]), "2026-11-24 07:00", "on Monday at noon UTC"),
    (Hours.model_validate({"timezone": "UTC", "holidays": ["2026-11-30"], "weekly": {"mon": ["12:30-13:00"]}}),
     "2026-11-24 07:00", "on Monday, December 7 at 12:30 p.m. UTC"),  # a week or more away: the date too
    (hours("America/New_York", tue=["00:00-06:00"]), "2026-11-24 03:00", "at midnight tonight, Eastern time"),  # Mon 22:00
    (hours("America/New_York", mon=["18:00-22:00"]), "2026-11-23 14:00", "today at 6 p.m. Eastern time"),
    # spring forward: a span starting in the skipped hour opens when the clocks jump
    (hours("America/New_York", sun=["02:30-05:00"]), "2026-03-08 06:00", "today at 3 a.m. Eastern time"),
    # fall back: 01:30-02:30 was open 01:30-02:00 EDT; at 01:10 EST it opens again at 01:30 EST
    (hours("America/New_York", sun=["01:30-02:30"]), "2026-11-01 06:10", "today at 1:30 a.m. Eastern time"),
    # Christmas in Sydney: Friday is a holiday there although it is still Thursday in UTC
    (Hours.model_validate({"timezone": "Australia/Sydney", "holidays": ["2026-12-25"],
                           "weekly": {d: ["09:00-17:00"] for d in ("mon", "tue", "wed", "thu", "fri")}}),
     "2026-12-24 13:30", "on Monday at 9 a.m. Australian Eastern time"),
]


@pytest.mark.parametrize("h,when,spoken", OPENS)
def test_next_opening_spoken_in_the_queues_zone(h: Hours, when: str, spoken: str) -> None:
    now = T(when)
    assert not h.is_open(now)
    nxt = h.next_opening(now)
    assert nxt is not None and nxt > now and h.is_open(nxt)
    assert not h.is_open(nxt.astimezone(UTC) - dt.timedelta(minutes=1))  # the moment it opens, not later
    assert say_opening(nxt, now) == spoken


# -- decide(): out-of-hours routing -------------------------------------------------------------------


def U(intent: str, conf: float = 0.95) -> Understanding:
    return Understanding(intent=intent, confidence=conf, alternatives=[(intent, conf)])


def run(policy: Policy, inputs: list[Input | dt.datetime], start: dt.datetime) -> list[Decision]:
    """Steps a call; a datetime in `inputs` moves the clock (as the conversation does before each turn)."""
    state = CallState(now=start)
    out = []
    for inp in [CallStart(), *inputs]:
        if isinstance(inp, dt.datetime):
            state = state.at(inp)
            continue
        d, state = step(policy, state, inp)
        out.append(d)
    return out


NIGHT = T("2026-11-24 03:00")  # Mon 22:00 New York: every queue but repair closed


def test_the_callback_offer_says_when_the_team_opens() -> None:
    d = run(DEFAULT, [U("speak_to_agent")], NIGHT)[-1]
    assert (d.action, d.reason, d.target) == ("confirm", "out_of_hours", "general")
    assert d.prompt.endswith("when we open tomorrow at 8 a.m. Eastern time?")


def test_chain_closed_queue_to_closed_queue_to_callback() -> None:
    """billing (closed) -> general (closed) -> callback: the offer names general's opening, not billing's."""
    d = run(DEFAULT, [U("billing_dispute")], T("2026-11-28 23:00"))[-1]  # Sat 18:00
    assert (d.action, d.reason, d.target) == ("confirm", "out_of_hours", "general")
    assert "on Monday at 8 a.m. Eastern time" in d.prompt
    d = run(DEFAULT, [U("billing_dispute")], T("2026-11-28 15:00"))[-1]  # Sat 10:00: general open
    assert (d.action, d.reason, d.target) == ("transfer", "out_of_hours", "general")


def test_a_call_that_outlives_opening_hours_is_routed_by_the_time_of_the_transfer() -> None:
    """Answered at 19:55 with general open; the caller asks for an agent at 20:05, after it closed."""
    ds = run(DEFAULT, [U("check_balance"), T("2026-11-24 01:05"), U("speak_to_agent")], T("2026-11-24 00:55"))
    assert (ds[-1].action, ds[-1].reason, ds[-1].target) == ("confirm", "out_of_hours", "general")
    ds = run(DEFAULT, [U("check_balance"), U("speak_to_agent")], T("2026-11-24 00:55"))
    assert (ds[-1].action, ds[-1].target) == ("transfer", "general")


def _doc() -> dict[str, Any]:
    return yaml.safe_load(DEFAULT_TEXT)


def _policy(doc: dict[str, Any]) -> Policy:
    return parse_policy(yaml.safe_dump(doc, sort_keys=False))


def test_opens_in_a_message_and_after_the_callback_answer() -> None:
    doc = _doc()
    doc["prompts"]["closed_msg"] = "Our team is closed. We open {opens}."
    doc["prompts"]["callback_done"] = "Great, we'll call you {opens}. Goodbye."
    doc["prompts"]["callback_declined"] = "Okay. We open {opens}. Goodbye."
    p = _policy(doc)
    done = run(p, [U("speak_to_agent"), U("affirm")], NIGHT)[-1]
    assert done.prompt == "Great, we'll call you tomorrow at 8 a.m. Eastern time. Goodbye."
    assert run(p, [U("speak_to_agent"), U("deny")], NIGHT)[-1].prompt == "Okay. We open tomorrow at 8 a.m. Eastern time. Goodbye."
    doc["queues"]["general"]["out_of_hours"] = {"action": "message", "prompt": "closed_msg"}
    d = run(_policy(doc), [U("speak_to_agent")], NIGHT)[-1]
    assert (d.action, d.reason) == ("hangup", "out_of_hours")
    assert d.prompt == "Our team is closed. We open tomorrow at 8 a.m. Eastern time."


@pytest.mark.parametrize("where,field", [
    ("apology_closed", "prompts.apology_closed"),  # pre-rendered for system failures: said as written
    ("still_there", "prompts.still_there"),
])
def test_opens_is_refused_where_nothing_fills_it(where: str, field: str) -> None:
    doc = _doc()
    doc["prompts"][where] = "We open {opens}. Goodbye."
    with pytest.raises(PolicyError) as info:
        _policy(doc)
    assert field in [e.field for e in info.value.errors], [str(e) for e in info.value.errors]


def test_opens_is_refused_in_a_move_to_another_queue() -> None:
    doc = _doc()
    doc["prompts"]["moved"] = "Billing opens {opens}; let me get you someone now."
    doc["queues"]["billing"]["out_of_hours"] = {"action": "queue", "queue": "general", "prompt": "moved"}
    with pytest.raises(PolicyError) as info:
        _policy(doc)
    assert "queues.billing.out_of_hours.prompt" in [e.field for e in info.value.errors]


def test_a_queue_closed_all_week_offers_the_callback_without_a_time() -> None:
    doc = _doc()
    doc["queues"]["general"]["hours"] = {"timezone": "UTC", "weekly": {}}
    d = run(_policy(doc), [U("speak_to_agent")], NIGHT)[-1]
    assert (d.action, d.reason, d.target) == ("confirm", "out_of_hours", "general")
    assert d.prompt.endswith("when we open later?") and "{" not in d.prompt


def test_a_published_localtime_zone_still_loads_leniently() -> None:
    """Refusing "localtime" is a lint: a version published before it keeps serving calls."""
    text = DEFAULT_TEXT.replace("timezone: America/New_York", "timezone: localtime", 1)
    assert parse_policy(text, lenient=True).queues["general"].hours is not None
