"""decide(): what the bot does next, as a pure function of (policy, call state, caller input).

One turn of the conversation:

    decision, state = step(policy, state, understanding_or_event)

`decide()` returns the Decision; `next_state()` derives the new CallState from the old state, the
input and the Decision alone (every field the next turn needs travels in the Decision), so the two
can also be called separately. Neither reads clocks, files or the network: `state.now` carries the
time for business hours. Every Decision carries a reason code from `Reason`.

Why no dialog can loop: every turn that does not end in an outcome (answer, transfer, hang-up)
counts as a stall, and `escalation.max_failures.max_stalled_turns` stalls in a row transfer the
caller; failed turns (no-match, "no" to a confirmation, silence, a wrong key) escalate even sooner.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Union, get_args

from engine.types import Understanding
from policies.decision import Decision, Resume
from policies.schema import Policy

Reason = Literal[
    "greeting",  # call start: the greeting
    "accepted",  # confident intent, acted on
    "confirm_requested",  # confidence in the confirm band: yes/no question
    "confirmed",  # caller said yes to the confirmation: acted on
    "denied",  # caller said no to the confirmation (a failed turn)
    "ambiguous",  # top two intents too close: asked which one
    "clarified",  # caller picked one of the two: acted on
    "low_confidence",  # not understood (a failed turn)
    "out_of_scope",  # a request this line does not handle (a failed turn)
    "no_context",  # yes/no/slot value with nothing pending (a failed turn)
    "no_input",  # silence timeout (a failed turn)
    "repeat",  # caller asked to hear that again
    "slot_missing",  # asked for a slot the intent needs
    "slot_filled",  # the last missing slot arrived: acted on
    "read_back",  # collected values read back before acting (intent settled): yes/no question
    "value_denied",  # caller said no to the read-back: the value is asked for again (a failed turn)
    "agent_requested",  # explicit request for a human
    "sensitive_intent",  # an intent that always goes to a specialist queue
    "frustration",  # caller-state frustration above the threshold
    "max_failures",  # too many failed or stalled turns in a row
    "dtmf_menu",  # keypad menu offered after repeated failures (a failed turn)
    "dtmf_selection",  # a menu key chose an intent: acted on
    "dtmf_invalid",  # a key that is no menu option (a failed turn)
    "engine_error",  # the speech engine failed: apology, transfer
    "redis_error",  # call state could not be stored: apology, transfer
    "out_of_hours",  # the queue is closed: message, callback offer or another queue
    "callback",  # caller accepted a callback: goodbye
    "goodbye",  # the caller is done (or declined a callback)
    "anything_else",  # "yes" to "Anything else?": asked what else, not a failed turn
    "resumed",  # "no" to a new request that interrupted a collection: its question asked again, values kept
    "stream_lost",  # a Twilio call lost its media stream too often: system-error route (system_error_route)
]
REASONS: tuple[str, ...] = get_args(Reason)

# Turns that count toward escalation.max_failures.count.
FAILURE_REASONS = frozenset({"denied", "value_denied", "low_confidence", "out_of_scope", "no_context", "no_input",
                             "dtmf_menu", "dtmf_invalid"})
FINAL_ACTIONS = frozenset({"answer", "transfer", "hangup"})  # an outcome: resets the stall counter
ENDING_ACTIONS = frozenset({"transfer", "hangup"})


# -- inputs beyond an Understanding ---------------------------------------------------------------


@dataclass(frozen=True)
class CallStart:
    """The call was answered: say the greeting."""


@dataclass(frozen=True)
class NoInput:
    """The caller said nothing for policy.no_input.timeout_s after the bot's last prompt."""


@dataclass(frozen=True)
class DtmfDigit:
    """Keypad input from Twilio or SIP (RFC 4733): one key, or a run of keys ended by '#'."""

    digits: str


@dataclass(frozen=True)
class EngineFailure:
    detail: str = ""


@dataclass(frozen=True)
class RedisFailure:
    detail: str = ""


Event = Union[CallStart, NoInput, DtmfDigit, EngineFailure, RedisFailure]
Input = Union[Understanding, Event]


# -- call state -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pending:
    """Something asked and awaiting an answer. intent None + queue set: a callback offer.
    read_back: the question reads collected values back ("That's 52 dollars, is that right?")."""

    intent: str | None
    slots: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None
    read_back: bool = False


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class CallState:
    """Everything decide() knows about a call. Immutable: next_state() returns a new one.
    The conversation sets `now` (dataclasses.replace / .at()) before each decision."""

    now: dt.datetime = field(default_factory=_utcnow)
    turn: int = 0  # caller inputs so far (utterances, silences, keys)
    failures: int = 0  # consecutive failed turns
    stalls: int = 0  # consecutive turns without an outcome
    no_inputs: int = 0  # consecutive silences
    pending_confirm: Pending | None = None
    pending_clarify: tuple[str, str] | None = None
    pending_collect: Pending | None = None
    # the collection (or read-back) a pending confirm/clarify about another request interrupted: a "no" resumes it
    interrupted: Resume | None = None
    collected: Mapping[str, Any] = field(default_factory=dict)  # slot values acted on this call
    # values the caller said before anything asked for them ("fifty dollars", an account number first):
    # kept, so the intent that needs them does not ask again, and handed to a human agent
    offered: Mapping[str, Any] = field(default_factory=dict)
    dtmf_digits: str = ""  # every key pressed this call
    menu_active: bool = False  # the keypad menu was offered and no outcome since
    last: Decision | None = None
    engine_error: bool = False
    redis_error: bool = False
    ended: bool = False

    def at(self, now: dt.datetime) -> "CallState":
        return dataclasses.replace(self, now=now)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["now"] = self.now.isoformat()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CallState":
        """Inverse of to_dict() (a JSON round trip: a Twilio call resumed on another worker carries on where
        it was). Raises ValueError/TypeError/KeyError on a document that is not one."""

        def pending(v: Any) -> Pending | None:
            return None if v is None else Pending(v["intent"], dict(v.get("slots") or {}), v.get("queue"),
                                                  bool(v.get("read_back")))

        def resume(v: Any) -> Resume | None:
            return None if v is None else Resume(str(v["intent"]), dict(v.get("slots") or {}), bool(v.get("read_back")))

        last = d.get("last")
        decision = None if last is None else Decision(
            str(last["action"]), str(last.get("prompt") or ""), last.get("target"), str(last.get("reason") or ""),
            last.get("intent"), dict(last.get("slots") or {}), str(last.get("style") or "neutral"),
            tuple(last.get("options") or ()), resume(last.get("resume")))
        clarify = d.get("pending_clarify")
        return cls(
            now=dt.datetime.fromisoformat(str(d["now"])), turn=int(d.get("turn", 0)),
            failures=int(d.get("failures", 0)), stalls=int(d.get("stalls", 0)), no_inputs=int(d.get("no_inputs", 0)),
            pending_confirm=pending(d.get("pending_confirm")),
            pending_clarify=None if clarify is None else (str(clarify[0]), str(clarify[1])),
            pending_collect=pending(d.get("pending_collect")), interrupted=resume(d.get("interrupted")),
            collected=dict(d.get("collected") or {}), offered=dict(d.get("offered") or {}),
            dtmf_digits=str(d.get("dtmf_digits") or ""), menu_active=bool(d.get("menu_active")), last=decision,
            engine_error=bool(d.get("engine_error")), redis_error=bool(d.get("redis_error")),
            ended=bool(d.get("ended")))


# -- prompts ------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}")
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _say(value: Any) -> str:
    """A slot value as the voice should read it."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() else f"{value:.2f}"
    s = str(value)
    return s.capitalize() if s.lower() in _DAYS else s


def render(template: str, values: Mapping[str, Any]) -> str:
    """Fill {placeholders}; a missing value is dropped rather than read out as '{amount}'."""
    text = _PLACEHOLDER.sub(lambda m: _say(values[m[1]]) if m[1] in values else "", template)
    return re.sub(r"\s{2,}", " ", text).strip()


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


# -- the decision ------------------------------------------------------------------------------------


def decide(policy: Policy, state: CallState, inp: Input) -> Decision:
    """The bot's next move. Pure: same (policy, state, input) -> same Decision."""
    if state.ended:
        return Decision("hangup", "", reason="goodbye")
    if isinstance(inp, CallStart):
        return Decision("answer", policy.prompts[policy.greeting], reason="greeting")
    if isinstance(inp, EngineFailure) or state.engine_error:
        return _system_error(policy, state, "engine_error")
    if isinstance(inp, RedisFailure) or state.redis_error:
        return _system_error(policy, state, "redis_error")
    if isinstance(inp, NoInput):
        d = _no_input(policy, state)
    elif isinstance(inp, DtmfDigit):
        d = _dtmf(policy, state, inp.digits)
    elif isinstance(inp, Understanding):
        d = _understood(policy, state, inp)
    else:  # a caller passing something else is a programming error, not caller input
        raise TypeError(f"decide() got {type(inp).__name__}")
    # Failure guard: whatever path re-asked (a menu key choosing the request whose value is being asked for
    # restarts its question), the failed turn that reaches max_failures goes to a person.
    if d.action not in ENDING_ACTIONS and is_failure(state, d) and _reaches_failure_limit(policy, state):
        return _escalate_failures(policy, state)
    # Loop guard: too many turns in a row without an outcome -> a human takes over.
    outcome = d.action in FINAL_ACTIONS and d.reason != "repeat"
    if not outcome and state.stalls + 1 >= policy.escalation.max_failures.max_stalled_turns:
        return _escalate_failures(policy, state)
    return d


def decide_event(policy: Policy, state: CallState, event: Event) -> Decision:
    """The entry point for non-speech events (call start, silence, keys, engine/Redis failure)."""
    return decide(policy, state, event)


def step(policy: Policy, state: CallState, inp: Input) -> tuple[Decision, CallState]:
    """decide() and next_state() together: what the conversation calls once per caller input."""
    d = decide(policy, state, inp)
    return d, next_state(state, inp, d)


def is_failure(state: CallState, d: Decision) -> bool:
    """A failed turn: no-match, "no" to a confirmation, silence, a wrong key, a slot question unanswered."""
    if d.reason in FAILURE_REASONS:
        return True
    if d.reason == "repeat":  # "say that again" is no failed answer (the stall count still bounds it)
        return False
    if _same_choice_again(state, d):
        return True
    p = state.pending_collect
    return d.action == "collect" and p is not None and p.intent == d.intent and len(d.slots) <= len(p.slots)


def _same_choice_again(state: CallState, d: Decision) -> bool:
    """An either-or answered with another unclear either-or (the same two requests or not): no progress."""
    return d.reason == "ambiguous" and state.pending_clarify is not None


def is_success(state: CallState, d: Decision) -> bool:
    """An outcome, a slot question answered, or a request understood (its first slot question or its
    read-back): ends a run of failures. Stalls still bound the dialog (see decide's loop guard)."""
    if d.action in FINAL_ACTIONS and d.reason != "repeat":
        return True
    p = state.pending_collect
    if d.action == "collect" and p is not None and p.intent == d.intent:
        return len(d.slots) > len(p.slots)
    # a request newly understood (accepted, confirmed, picked, keyed) that now asks for or reads back its values:
    # a caller who got through after mumbling must not be transferred for one unclear amount. Answers within the
    # same request's values (a read-back denied and said again) do not reset the count.
    pc = state.pending_confirm
    same = {p.intent if p else None, pc.intent if pc and pc.read_back else None}
    return (d.intent is not None and d.intent not in same
            and (d.reason == "read_back" or (d.action == "collect" and d.reason == "slot_missing")))


def next_state(state: CallState, inp: Input, d: Decision) -> CallState:
    """The state after `d` answered `inp`. Pure; pending questions come from the Decision's fields."""
    caller_turn = isinstance(inp, (Understanding, NoInput, DtmfDigit))
    final = d.action in FINAL_ACTIONS and d.reason != "repeat"
    success = is_success(state, d)
    return dataclasses.replace(
        state,
        turn=state.turn + int(caller_turn),
        failures=0 if success else state.failures + int(is_failure(state, d)),
        stalls=0 if final or not caller_turn else state.stalls + 1,
        no_inputs=state.no_inputs + 1 if isinstance(inp, NoInput) else 0,
        pending_confirm=Pending(d.intent, dict(d.slots), d.target, read_back=_reads_back(state, d))
        if d.action == "confirm" else None,
        pending_clarify=(d.options[0], d.options[1]) if d.action == "clarify" and len(d.options) == 2 else None,
        pending_collect=Pending(d.intent, dict(d.slots)) if d.action == "collect" else None,
        interrupted=d.resume if d.action in ("confirm", "clarify") else None,
        collected={**state.collected, **d.slots} if final and d.slots else state.collected,
        offered=_offered(state, inp, d),
        dtmf_digits=state.dtmf_digits + inp.digits if isinstance(inp, DtmfDigit) else state.dtmf_digits,
        menu_active=d.action == "dtmf_menu" or (state.menu_active and not final),
        last=d,
        engine_error=state.engine_error or isinstance(inp, EngineFailure),
        redis_error=state.redis_error or isinstance(inp, RedisFailure),
        ended=d.action in ENDING_ACTIONS,
    )


def _offered(state: CallState, inp: Input, d: Decision) -> Mapping[str, Any]:
    """Values said with nothing asking for them are remembered; a value a decision has taken up leaves
    (it is in the decision's slots now: read back, collected, or dropped when the caller says it was wrong)."""
    left = {k: v for k, v in state.offered.items() if k not in d.slots}
    if d.reason == "no_context" and isinstance(inp, Understanding) and inp.intent is None and inp.slots:
        left.update(inp.slots)
    last = state.last
    if (isinstance(inp, Understanding) and inp.slots and last is not None and d.action == last.action
            and d.action in ("collect", "confirm", "clarify") and d.intent == last.intent
            and d.reason in ("slot_missing", "low_confidence") and dict(d.slots) == dict(last.slots)):
        # a value the pending question did not ask for ("How much?" -> an account number), the question asked
        # again: kept for the request that needs it and for the human agent, not dropped with the re-ask
        left.update({k: v for k, v in inp.slots.items() if k not in d.slots})
    return left


def _reads_back(state: CallState, d: Decision) -> bool:
    """A read-back question, asked now or asked again (after silence, "say that again", an unclear answer:
    _reask repeats the same question under another reason)."""
    if d.reason == "read_back" or (d.reason == "resumed" and d.action == "confirm"):
        return True
    pc = state.pending_confirm
    return pc is not None and pc.read_back and d.intent == pc.intent and dict(d.slots) == dict(pc.slots)


# -- routing to queues --------------------------------------------------------------------------------


def _route(policy: Policy, state: CallState, queue: str, reason: str, prompt_key: str | None = None, *,
           intent: str | None = None, slots: Mapping[str, Any] | None = None, style: str = "neutral",
           system_error: bool = False, queue_prompt: bool = False) -> Decision:
    """Transfer to `queue`, honouring business hours: a closed queue gives its out-of-hours
    message, a callback offer, or the next queue in its chain (validated to end). The callback
    question is asked once and never at the stall limit: then the caller hears the goodbye.
    `queue_prompt`: prompt_key announces `queue` itself ("our billing team"); when a closed queue
    sends the caller on to another one, that queue is announced instead (the closed queue's
    out-of-hours prompt, else the reached queue's prompt, else the generic `transfer`)."""
    slots = dict(slots or {})
    seen: list[str] = []
    q = queue
    moved_prompt: str | None = None  # out-of-hours prompt of the last closed queue that moved the caller on
    while q not in seen:
        seen.append(q)
        spec = policy.queues[q]
        if spec.hours is None or spec.hours.is_open(state.now):
            if queue_prompt and q != queue:
                key = moved_prompt or spec.prompt or "transfer"
            else:
                key = prompt_key or spec.prompt or "transfer"
            return Decision("transfer", render(policy.prompts[key], slots), target=q,
                            reason=reason if q == queue else "out_of_hours", intent=intent, slots=slots, style=style)
        ooh = spec.out_of_hours
        assert ooh is not None  # schema: a queue with hours has out_of_hours
        if ooh.action == "queue" and ooh.queue:
            q = ooh.queue
            moved_prompt = ooh.prompt or None
            continue
        if system_error:  # no callback question when the engine or Redis is down: say sorry, end
            return Decision("hangup", policy.prompts.get("apology_closed", policy.prompts["apology"]), target=q,
                            reason=reason, intent=intent, style="calm")
        text = _closed_prompt(policy, ooh.prompt or "goodbye", q, state.now)
        if ooh.action == "callback":  # a yes/no question; intent None + target marks it as a callback
            asked = state.pending_confirm is not None and state.pending_confirm.intent is None
            if asked or state.stalls + 1 >= policy.escalation.max_failures.max_stalled_turns:
                return Decision("hangup", _closed_prompt(policy, "callback_declined", q, state.now),
                                target=q, reason="out_of_hours", style=style)
            # asked for by the caller (a person, frustration, a request that goes to a team) in the middle of a
            # collection: a "no" to the callback goes back to it (the caller still wants to pay). Not when the
            # failure or silence rules escalate: the bot could not get the value, asking again restarts the loop
            back = _interrupted(state) if reason not in ("max_failures", "no_input") else None
            return Decision("confirm", text, target=q, reason="out_of_hours", style=style, resume=back)
        return Decision("hangup", text, target=q, reason="out_of_hours", intent=intent, style=style)
    raise AssertionError("out-of-hours cycle passed validation")  # schema rejects cycles


def _closed_prompt(policy: Policy, key: str, queue: str | None, now: dt.datetime) -> str:
    """A prompt said because `queue` is closed (`goodbye` if the policy lacks `key`), {opens} filled."""
    text = policy.prompts.get(key, policy.prompts["goodbye"])
    if "{opens}" not in text:
        return text
    spec = policy.queues.get(queue or "")
    nxt = spec.hours.next_opening(now) if spec is not None and spec.hours is not None else None
    text = render(text, {"opens": say_opening(nxt, now) if nxt is not None else "later"})
    return re.sub(r"([ap]\.m\.)\.", r"\1", text)  # "We open at 8 a.m.." when {opens} ends a sentence


_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")


def say_opening(opens: dt.datetime, now: dt.datetime) -> str:
    """When a closed queue opens, as a caller should hear it, in the queue's zone (`opens`'s tzinfo), which is
    named: a caller in another zone (or a team answering for several) must know whose 8:30 it is.
    "today at 5 p.m. Eastern time", "tomorrow at 8:30 a.m. UK time", "on Monday at 9 a.m. Pacific time",
    "on Monday, January 5 at 9 a.m. Eastern time"."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.timezone.utc)
    today = now.astimezone(opens.tzinfo).date()
    h = opens.hour % 12 or 12
    clock = f"{h}:{opens.minute:02d}" if opens.minute else str(h)
    clock += " a.m." if opens.hour < 12 else " p.m."
    if (opens.hour, opens.minute) == (12, 0):
        clock = "noon"
    days = (opens.date() - today).days
    zone = say_zone(opens)
    if days == 1 and (opens.hour, opens.minute) == (0, 0):  # "tomorrow at 12 a.m." is heard as the wrong night
        return f"at midnight tonight, {zone}"
    clock = f"{clock} {zone}"
    if days == 0:
        return f"today at {clock}"
    if days == 1:
        return f"tomorrow at {clock}"
    weekday = _DAYS[opens.weekday()].capitalize()
    if days < 7:
        return f"on {weekday} at {clock}"
    return f"on {weekday}, {_MONTHS[opens.month - 1]} {opens.day} at {clock}"


# How a contact center names a zone's local time. Keyed by the abbreviation the zone uses at that moment
# (so EST and EDT are both "Eastern time": callers know the name, not whether DST is on), for zones of the
# regions that use it ("CST" is also China's and Cuba's); zones whose abbreviations are ambiguous or numeric
# ("IST", "+04") are named by zone, then by their city.
_AMERICAS = ("America/", "US/", "Canada/", "Pacific/Honolulu", "EST5EDT", "CST6CDT", "MST7MDT", "PST8PDT")
_EUROPE = ("Europe/", "Africa/", "Atlantic/", "CET", "EET", "WET", "MET")
_ZONE_ABBR_NAMES: dict[str, tuple[str, tuple[str, ...]]] = {
    **{a: ("Eastern time", _AMERICAS) for a in ("EST", "EDT")},
    **{a: ("Central time", _AMERICAS) for a in ("CST", "CDT")},
    **{a: ("Mountain time", _AMERICAS) for a in ("MST", "MDT")},
    **{a: ("Pacific time", _AMERICAS) for a in ("PST", "PDT")},
    **{a: ("Alaska time", _AMERICAS) for a in ("AKST", "AKDT")},
    **{a: ("Hawaii time", _AMERICAS) for a in ("HST", "HDT")},
    **{a: ("Atlantic time", _AMERICAS) for a in ("AST", "ADT")},
    **{a: ("Newfoundland time", _AMERICAS) for a in ("NST", "NDT")},
    **{a: ("Central European time", _EUROPE) for a in ("CET", "CEST", "MET", "MEST")},
    **{a: ("Eastern European time", _EUROPE) for a in ("EET", "EEST")},
    **{a: ("Western European time", _EUROPE) for a in ("WET", "WEST")},
    **{a: ("Australian Eastern time", ("Australia/",)) for a in ("AEST", "AEDT")},
    **{a: ("Australian Central time", ("Australia/",)) for a in ("ACST", "ACDT")},
    "AWST": ("Australian Western time", ("Australia/",)),
    **{a: ("New Zealand time", ("Pacific/Auckland", "NZ", "Antarctica/")) for a in ("NZST", "NZDT")},
    "JST": ("Japan time", ("Asia/Tokyo", "Japan")), "KST": ("Korea time", ("Asia/Seoul", "ROK")),
    "SAST": ("South Africa time", ("Africa/",)),
}
_ZONE_NAMES = {
    "Europe/London": "UK time", "Europe/Belfast": "UK time", "GB": "UK time", "Europe/Dublin": "Irish time",
    "Eire": "Irish time", "Asia/Kolkata": "India time", "Asia/Calcutta": "India time",
    "Asia/Jerusalem": "Israel time", "Asia/Tel_Aviv": "Israel time", "Israel": "Israel time",
    "America/Phoenix": "Arizona time",  # Mountain Standard all year: "Mountain time" misleads half the year
    "Asia/Manila": "Philippine time", "Asia/Shanghai": "China time", "Asia/Hong_Kong": "Hong Kong time",
    "Asia/Singapore": "Singapore time", "America/Havana": "Cuba time", "Cuba": "Cuba time",
    "UTC": "UTC", "Etc/UTC": "UTC", "Etc/UCT": "UTC", "Etc/Universal": "UTC", "Etc/Zulu": "UTC", "Universal": "UTC",
    "Zulu": "UTC", "UCT": "UTC", "Etc/GMT": "GMT", "GMT": "GMT", "Etc/Greenwich": "GMT", "Greenwich": "GMT",
}


def say_zone(when: dt.datetime) -> str:
    """The zone of `when` as a caller should hear it after a clock time: "Eastern time", "UK time",
    "Dubai time" (a zone with no common name: its city), "UTC plus 4" (a bare offset)."""
    key = str(getattr(when.tzinfo, "key", "") or "")
    if key in _ZONE_NAMES:
        return _ZONE_NAMES[key]
    named = _ZONE_ABBR_NAMES.get(when.tzname() or "")
    if named is not None and key.startswith(named[1]):
        return named[0]
    city = key.rsplit("/", 1)[-1].replace("_", " ") if "/" in key and not key.startswith("Etc/") else ""
    if city:
        return f"{city} time"
    off = when.utcoffset() or dt.timedelta(0)
    minutes = int(off.total_seconds() // 60)
    if minutes == 0:
        return "UTC"
    h, m = divmod(abs(minutes), 60)
    return f"UTC {'plus' if minutes > 0 else 'minus'} {h}" + (f":{m:02d}" if m else "")


def system_error_route(policy: Policy, reason: Reason, now: dt.datetime | None = None) -> Decision:
    """Where a call goes when the bot itself cannot carry it on (a Twilio call whose streams kept failing): the
    escalation rule `system_error`'s queue with its apology, or the apology and goodbye when that queue is closed."""
    return _system_error(policy, CallState(now=now or _utcnow()), reason)


def _system_error(policy: Policy, state: CallState, reason: str) -> Decision:
    rule = policy.escalation.system_error
    return _route(policy, state, rule.queue, reason, rule.prompt or "apology", style="calm", system_error=True)


def _escalate_failures(policy: Policy, state: CallState) -> Decision:
    rule = policy.escalation.max_failures
    return _route(policy, state, rule.queue, "max_failures", rule.prompt, style="calm")


# -- failures --------------------------------------------------------------------------------------


def _reaches_failure_limit(policy: Policy, state: CallState) -> bool:
    """This turn fails and reaches max_failures: whatever would be asked again, the caller goes to a person."""
    return state.failures + 1 >= policy.escalation.max_failures.count


def _fail(policy: Policy, state: CallState, reason: str, prompt_key: str) -> Decision:
    """A failed turn: escalate after max_failures, offer the keypad menu after dtmf.after_failures,
    otherwise reprompt."""
    if _reaches_failure_limit(policy, state):
        return _escalate_failures(policy, state)
    text = policy.prompts[prompt_key]
    if policy.dtmf.enabled and state.failures + 1 >= policy.dtmf.after_failures:
        return Decision("dtmf_menu", _join(text, policy.prompts[policy.dtmf.prompt]), reason="dtmf_menu",
                        options=tuple(policy.dtmf.options))
    return Decision("reprompt", text, reason=reason)


# openings a question may carry from the turn that asked it; a re-ask says its own opening instead
# ("Sorry about that." after a read-back denied is no answer to an unclear amount)
# said before the interrupted question when a caller declines a callback ("Okay, let's pick up where we left off.")
RESUME_PROMPT = "resume_after_callback"
_REASK_PREFIXES = ("slot_retry", "still_there", "reprompt", "value_denied", RESUME_PROMPT)


def _reask(policy: Policy, state: CallState, reason: str, prefix_key: str) -> Decision | None:
    """Ask the pending question again (confirm, clarify, slot) after a turn that did not answer it.
    Counts as a failed turn, so it escalates like any other; None when nothing is pending."""
    last = state.last
    if last is None or last.action not in ("confirm", "clarify", "collect"):
        return None
    if _reaches_failure_limit(policy, state):
        return _escalate_failures(policy, state)
    question = last.prompt
    prefixes = [p for p in (policy.prompts.get(k, "") for k in _REASK_PREFIXES) if p]
    while (hit := next((p for p in prefixes if question.startswith(p + " ")), None)) is not None:
        question = question[len(hit) + 1:]  # the last re-ask's "Sorry, I didn't get that." is not said twice
    prompt = _join(policy.prompts.get(prefix_key, ""), question)
    return dataclasses.replace(last, prompt=prompt, reason="slot_missing" if last.action == "collect" else reason)


# -- no input and keys ------------------------------------------------------------------------------


def _no_input(policy: Policy, state: CallState) -> Decision:
    rule = policy.no_input
    if state.no_inputs + 1 >= rule.max:
        if rule.then == "transfer" and rule.queue:
            return _route(policy, state, rule.queue, "no_input")
        return Decision("hangup", policy.prompts[rule.final_prompt], reason="no_input")
    again = _reask(policy, state, "no_input", "still_there")
    if again is not None:
        return dataclasses.replace(again, reason="no_input") if again.action != "transfer" else again
    return _fail(policy, state, "no_input", rule.prompt)


def _dtmf(policy: Policy, state: CallState, digits: str) -> Decision:
    keys = digits.rstrip("#")
    p = state.pending_collect
    if p is not None and p.intent is not None:
        # The slot being collected takes the keys as its value: an account number, or an amount ("50#",
        # "50*25#" for 50.25: the star is the keypad's decimal point)
        missing = _missing_slots(policy, p.intent, p.slots)
        slot = policy.slots.get(missing[0]) if missing else None
        value = _keypad_value(slot.type, keys) if slot is not None else None
        if value is not None:
            return _collect(policy, state, p.intent, {**p.slots, missing[0]: value}, "slot_filled")
    pc = state.pending_confirm
    if pc is not None and pc.read_back and pc.intent is not None and _keys_are_a_value(policy, digits):
        # "That's 15 dollars, is that right?" -> 50#: the caller typed the right value (as "no, fifty" says it)
        slot = _keypad_slot(policy, pc.intent)
        value = _keypad_value(policy.slots[slot].type, keys) if slot is not None else None
        if slot is not None and value is not None:
            return _read_back(policy, pc.intent, {**pc.slots, slot: value})
    if pc is not None and pc.intent is not None and (slot := _confirm_takes_keys(policy, state)) is not None \
            and _keys_are_a_value(policy, digits):
        # "You'd like to pay your bill?" -> 40#: a yes with the amount, as "yes, forty dollars" is (read back next)
        value = _keypad_value(policy.slots[slot].type, keys)
        if value is not None:
            return _collect(policy, state, pc.intent, {**pc.slots, slot: value}, "slot_filled")
    if (back := state.interrupted) is not None and _keys_are_a_value(policy, digits):
        # "How much would you like to pay?" -> "cancel?" -> "You'd like to cancel?" -> 40#: the keys answer the
        # interrupted question (as a "no" would resume it), not a menu
        slot = _keypad_slot(policy, back.intent)
        value = _keypad_value(policy.slots[slot].type, keys) if slot is not None else None
        if slot is not None and value is not None:
            if back.read_back:
                return _read_back(policy, back.intent, {**back.slots, slot: value})
            if slot in _missing_slots(policy, back.intent, back.slots):
                return _collect(policy, state, back.intent, {**back.slots, slot: value}, "slot_filled")
    target = policy.dtmf.options.get(keys[:1]) if len(keys) == 1 else None
    if target is not None:
        if pc is not None and pc.read_back and pc.intent == target:
            # the key for the request being read back (1 = pay a bill, at "That's 15 dollars, is that right?") is
            # no yes: the read-back is asked again (a failed turn), its values kept; restarting the request
            # dropped the amount and asked for it again
            again = _reask(policy, state, "low_confidence", "slot_retry")
            if again is not None:
                return again
        # the key for the request whose values are being asked for keeps the values it has
        return _act(policy, state, target, dict(p.slots) if p is not None and p.intent == target else {},
                    "dtmf_selection")
    sorry = policy.prompts.get("dtmf_invalid", policy.prompts["reprompt"])
    if not policy.dtmf.enabled:
        return _fail(policy, state, "dtmf_invalid", "reprompt")
    if _reaches_failure_limit(policy, state):
        return _escalate_failures(policy, state)
    return Decision("dtmf_menu", _join(sorry, policy.prompts[policy.dtmf.prompt]), reason="dtmf_invalid",
                    options=tuple(policy.dtmf.options))


def _confirm_takes_keys(policy: Policy, state: CallState) -> str | None:
    """At "You'd like to pay your bill?" (a request not yet confirmed, its amount not yet given) the keypad
    slot keys may type ("40#": yes, and that much); None when there is none."""
    pc = state.pending_confirm
    if pc is None or pc.read_back or pc.intent is None or pc.intent not in policy.intents:
        return None
    slot = _keypad_slot(policy, pc.intent)
    return slot if slot is not None and slot in _missing_slots(policy, pc.intent, pc.slots) else None


def _keys_are_a_value(policy: Policy, digits: str) -> bool:
    """Keys typed at a read-back are a value unless they are one menu key on its own (no '#')."""
    return digits.endswith("#") or len(digits) > 1 or digits not in policy.dtmf.options


def _keypad_slot(policy: Policy, intent: str) -> str | None:
    """The one value of `intent` that keys can type (an amount, a number), or None (several, or days only)."""
    typed = [s for s in policy.intents[intent].action.collect
             if s in policy.slots and policy.slots[s].type in ("money", "digits")]
    return typed[0] if len(typed) == 1 else None


def reads_back_keys(policy: Policy, state: CallState) -> bool:
    """A read-back is pending whose value the keypad can type: keys are an answer being typed, not a menu key
    to act on at once (the conversation waits for '#' or the inter-digit pause)."""
    pc = state.pending_confirm
    if pc is not None and pc.read_back and pc.intent is not None and _keypad_slot(policy, pc.intent) is not None:
        return True
    if _confirm_takes_keys(policy, state):
        return True
    back = state.interrupted  # a question about another request interrupted an amount: "40#" may be its answer
    return back is not None and _keypad_slot(policy, back.intent) is not None


_KEYPAD_MONEY = re.compile(r"(\d{1,7})(?:\*(\d{1,2}))?")


def _keypad_value(slot_type: str, keys: str) -> Any:
    """Keys typed for a slot as its value, or None when they cannot be one (days have no keypad form)."""
    if slot_type == "digits" and keys.isdigit():
        return keys
    if slot_type == "money" and (m := _KEYPAD_MONEY.fullmatch(keys)):
        amount = int(m[1]) + (int(m[2].ljust(2, "0")) / 100 if m[2] else 0.0)
        return round(amount, 2) if amount > 0 else None
    return None


# -- understood speech --------------------------------------------------------------------------------


def _understood(policy: Policy, state: CallState, u: Understanding) -> Decision:
    d = _heard(policy, state, u)
    back = _interrupted(state)
    given = back is not None and any(k in policy.intents[back.intent].action.collect for k in back.slots)
    if (d.action == "hangup" and d.reason == "goodbye" and d.intent is not None and back is not None
            and (back.read_back or given) and "goodbye_unconfirmed" in policy.prompts):
        # "That's a payment of 15 dollars, is that right?" -> "bye": nothing was paid, and the caller must not
        # hang up believing it was ("Thanks for calling. Goodbye." sounds like a done deal). Likewise part way
        # through a request that takes several values (the amount given, the day asked for)
        d = dataclasses.replace(d, prompt=policy.prompts["goodbye_unconfirmed"])
    if (back is not None and d.resume is None and d.reason in ("confirm_requested", "ambiguous")
            and back.intent not in (d.intent, *d.options)):
        # a question about another request, asked in the middle of a collection: a "no" to it goes back to
        # the interrupted question with its values ("What can I help you with?" would lose the payment)
        d = dataclasses.replace(d, resume=back)
    return d


def _interrupted(state: CallState) -> Resume | None:
    """The collection a new request would interrupt now: a value asked for, a read-back, or the one an
    earlier question about another request already interrupted."""
    if (p := state.pending_collect) is not None and p.intent is not None:
        return Resume(p.intent, dict(p.slots))
    if (pc := state.pending_confirm) is not None and pc.read_back and pc.intent is not None:
        return Resume(pc.intent, dict(pc.slots), read_back=True)
    return state.interrupted


def _resume(policy: Policy, state: CallState, back: Resume, values: Mapping[str, Any] | None = None) -> Decision:
    """Back to the interrupted question, its values kept: no failed turn (the caller answered the question
    they were asked), and no new request either (the run of failures and stalls goes on). `values`: what the
    caller said with the "no" ("No, sixty dollars"), taken as that question's answer."""
    slots = {**back.slots, **(values or {})}
    if back.read_back:
        d = _read_back(policy, back.intent, slots)
        return d if slots != dict(back.slots) else dataclasses.replace(d, reason="resumed")
    missing = _missing_slots(policy, back.intent, slots)
    if values or not missing:
        return _collect(policy, state, back.intent, slots, "slot_filled")
    action = policy.intents[back.intent].action
    return Decision("collect", policy.prompts[action.ask[missing[0]]], reason="resumed", intent=back.intent,
                    slots=slots)


def _heard(policy: Policy, state: CallState, u: Understanding) -> Decision:
    esc = policy.escalation
    top, conf = u.intent, u.confidence
    if top == esc.agent_request.intent and conf >= policy.accept_for(top):
        return _route(policy, state, esc.agent_request.queue, "agent_requested", esc.agent_request.prompt,
                      intent=top)
    affirm, deny = policy.intent_of_type("affirm"), policy.intent_of_type("deny")
    ctx = policy.thresholds.context_accept
    # A frustrated caller offered a callback (the queue is closed: the frustration rule already routed them
    # here) who answers yes or no gets what they answered, not "please call back" after a yes.
    # An unsure yes/no (under context_accept, in its confirm band) gets the offer asked again, as any caller's
    # would: letting them go with "please call back" may be the opposite of the "yes" they said.
    callback_answer = (state.pending_confirm is not None and state.pending_confirm.intent is None
                       and top in (affirm, deny) and top is not None and conf >= min(ctx, policy.confirm_for(top)))
    # Likewise a frustrated "yes" to a read-back ("That's 50 dollars, right?" - "YES!") completes what the caller
    # just confirmed; handing them to a person instead would throw the finished payment away.
    read_back_yes = (state.pending_confirm is not None and state.pending_confirm.read_back
                     and state.pending_confirm.intent is not None and top == affirm and conf >= ctx
                     and not any(k in policy.intents[state.pending_confirm.intent].action.collect
                                 and state.pending_confirm.slots.get(k) != v for k, v in u.slots.items()))
    frustrated = u.caller_state.get("frustration", 0.0) >= esc.frustration.threshold
    if frustrated and not callback_answer and not read_back_yes:
        d = _route(policy, state, esc.frustration.queue, "frustration", esc.frustration.prompt, style="calm")
        if d.resume is not None and d.resume.read_back and top == deny and conf >= ctx:
            # "That's 40 dollars, right?" -> "NO!" (a callback offered): declining the callback must not read back
            # the amount the caller just said was wrong: back to asking for it, or to reading back the one they
            # said instead ("No, fifty!")
            collect = policy.intents[d.resume.intent].action.collect
            said = _values_instead(policy, Pending(d.resume.intent, d.resume.slots, read_back=True), u)
            back = (Resume(d.resume.intent, {**d.resume.slots, **said}, read_back=True) if said else
                    Resume(d.resume.intent, {k: v for k, v in d.resume.slots.items() if k not in collect}))
            d = dataclasses.replace(d, resume=back)
        return d
    if u.error is not None:
        return _reask(policy, state, "low_confidence", "slot_retry") or _fail(policy, state, "low_confidence",
                                                                              "reprompt")
    probs = {name: p for name, p in u.alternatives}
    probs.setdefault(top, conf)

    back = state.interrupted
    if back is not None and top is not None and top == back.intent and conf >= policy.confirm_for(top):
        # "You'd like to check your balance?" -> "No, I want to pay my bill": back to the payment, its values kept
        # (accepting pay_bill afresh would ask for the amount again)
        return _resume(policy, state, back, {k: v for k, v in u.slots.items()
                                             if k in policy.intents[back.intent].action.collect})
    if back is not None and top in (None, deny) and conf >= ctx:
        # "You'd like to cancel?" -> "(no,) sixty dollars": the answer to the question the new request interrupted
        values = {k: v for k, v in u.slots.items() if k in policy.intents[back.intent].action.collect}
        if values:
            return _resume(policy, state, back, values)

    if (pc := state.pending_confirm) is not None:
        if pc.read_back and pc.intent is not None:
            # "No, fifty two dollars": a new value for a read-back slot is read back in its turn
            fixed = _values_instead(policy, pc, u)
            if fixed:
                return _read_back(policy, pc.intent, {**pc.slots, **fixed})
        spec = policy.intents.get(pc.intent or "")
        if (spec is not None and not pc.read_back and top is None and conf >= ctx and spec.action.type == "collect"
                and spec.action.read_back):
            # "You'd like to pay your bill?" -> "forty dollars": the value answers yes (as "yes, forty dollars"
            # does); "What can I help you with today?" dropped the request. Its read-back still asks before acting.
            values = {k: v for k, v in u.slots.items() if k in spec.action.collect}
            if values:
                return _act(policy, state, pc.intent, {**pc.slots, **values}, "confirmed")
        if top == affirm and conf >= ctx:
            if pc.intent is None:  # a callback offer accepted
                return Decision("hangup", _closed_prompt(policy, "callback_done", pc.queue, state.now),
                                target=pc.queue, reason="callback")
            if pc.read_back:
                return _done(policy, pc.intent, pc.slots, "confirmed")
            # "Yes, sixty dollars" to "You'd like to pay your bill?": the value comes with the yes
            return _act(policy, state, pc.intent, {**pc.slots, **u.slots}, "confirmed")
        if top == deny and conf >= ctx:
            if pc.intent is None:
                if state.interrupted is not None:
                    # "How much would you like to pay?" -> "agent" -> "...call you back?" -> "no": the caller
                    # declined the callback, not the payment: back to it, its values kept
                    d = _resume(policy, state, state.interrupted)
                    return dataclasses.replace(d, prompt=_join(policy.prompts.get(RESUME_PROMPT, ""), d.prompt))
                return Decision("hangup", _closed_prompt(policy, "callback_declined", pc.queue, state.now),
                                reason="goodbye")
            if pc.read_back:  # the intent stands; the values were misheard: ask for them again
                return _reask_values(policy, state, pc.intent, pc.slots)
            if state.interrupted is not None:  # "No, I don't want to cancel": back to the amount
                return _resume(policy, state, state.interrupted)
            return _fail(policy, state, "denied", "denied")
        # a read-back is about the values: restating its intent confirms them only when heard as surely as a yes
        # (a mumble heard as pay_bill at 0.25 must not move money)
        restate_at = max(policy.confirm_for(top), ctx) if pc.read_back else policy.confirm_for(top)
        if pc.intent is not None and top == pc.intent and conf >= restate_at:
            # "Yes, I want to pay my bill": restating the intent answers the question.
            if pc.read_back:
                return _done(policy, pc.intent, pc.slots, "confirmed")
            return _act(policy, state, pc.intent, {**pc.slots, **u.slots}, "confirmed")
        if pc.read_back and top == pc.intent and conf >= policy.confirm_for(top):
            # the request heard again, not surely enough to pay on: the read-back is asked again (not "You'd like
            # to pay your bill?", which it already is)
            again = _reask(policy, state, "low_confidence", "slot_retry")
            if again is not None:
                return again
    if (pair := state.pending_clarify) is not None:
        pick = max(pair, key=lambda n: probs.get(n, 0.0))
        if probs.get(pick, 0.0) >= ctx:
            return _act(policy, state, pick, u.slots, "clarified")
        if top == deny and conf >= ctx:  # "neither"
            if state.interrupted is not None:
                return _resume(policy, state, state.interrupted)
            return _fail(policy, state, "denied", "denied")
        if top == affirm and conf >= ctx:  # "yes" to "A, or B?" picks neither: ask the choice again
            again = _reask(policy, state, "low_confidence", "slot_retry")
            if again is not None:
                return again
    if (pcol := state.pending_collect) is not None and pcol.intent is not None:
        missing = _missing_slots(policy, pcol.intent, pcol.slots)
        new = {k: v for k, v in u.slots.items() if k in missing}
        # an answer that carries the asked-for value is not a goodbye, whatever the label (slow digit-by-digit
        # reading was scored "goodbye" on real speech; hanging up on it is the worst outcome)
        hangs_up = top in policy.intents and policy.intents[top].action.type == "hangup"
        elsewhere = (top not in (None, pcol.intent) and conf >= policy.accept_for(top) and top not in (affirm, deny)
                     and not (new and hangs_up))
        # "agent" said in its confirm band while a value is asked for: the caller asked for a person, so they
        # are asked whether they want one (as anywhere else), never told "Sorry, I didn't get that"
        asks_agent = not new and top == esc.agent_request.intent and conf >= policy.confirm_for(top)
        # "Actually, I want to cancel" heard clearly but under that intent's (stricter) accept: the caller
        # changed their mind, so they are asked whether they want that, as anywhere else; "Sorry, I didn't get
        # that. How much would you like to pay?" ignores them and counts a failed turn
        # (not a goodbye: digits read slowly have been heard as one, and "end the call?" would confuse them)
        switches = (not new and top in policy.intents and top not in (pcol.intent, affirm, deny)
                    and policy.intents[top].action.type in ("answer", "collect", "transfer")
                    and conf >= max(policy.confirm_for(top), ctx))
        if new and not elsewhere:
            return _collect(policy, state, pcol.intent, {**pcol.slots, **new}, "slot_filled")
        if (not elsewhere and not asks_agent and not switches
                and top != policy.intent_of_type("repeat")):  # repeat: handled below
            # heard well, just not the value asked for (the request said again, an account number when asked the
            # amount): the question again without "Sorry, I didn't get that", which tells them they were not heard
            heard = ((top == pcol.intent and conf >= policy.confirm_for(top))
                     or (top is None and bool(u.slots) and conf >= ctx))
            again = _reask(policy, state, "slot_missing", "" if heard else "slot_retry")
            if again is not None:
                return again

    done = _asked_anything_else(state) or _asked_what_else(policy, state)
    if top == deny and conf >= ctx and not u.slots and done:
        # "Anything else?" -> "No, thanks" (also "What else?" -> "No"): the caller is done; a "What can I help
        # you with?" here would count their goodbye as a failed turn and, said a few times, send them to an agent
        return _goodbye(policy)
    if top == affirm and conf >= ctx and _asked_anything_else(state):
        # "Anything else?" -> "Yes": they have another request. "Sorry, what can I help you with?" as a failed
        # turn would send a caller with three requests to an agent for saying yes each time.
        return Decision("answer", policy.prompts.get("anything_else") or policy.prompts["no_context"],
                        reason="anything_else")
    if top is None:  # only slot values, with no question asking for them
        if u.slots and conf >= ctx:
            # a value that answers none of the pending question (an account number at "You'd like to pay your
            # bill?" or at a read-back): that question again; "What can I help you with today?" dropped it
            again = _reask(policy, state, "low_confidence", "")
            return again or _fail(policy, state, "no_context", "no_context")
        return _reask(policy, state, "low_confidence", "slot_retry") or _fail(policy, state, "low_confidence",
                                                                              "reprompt")
    # Two task intents almost equally likely: ask which one rather than guess.
    tasks = [(n, p) for n, p in sorted(probs.items(), key=lambda kv: -kv[1])
             if n is not None and n in policy.intents and policy.intents[n].action.type in
             ("answer", "collect", "transfer", "hangup")]
    t = policy.thresholds
    if (len(tasks) >= 2 and tasks[0][0] == top and tasks[0][1] < policy.accept_for(top)
            and tasks[0][1] - tasks[1][1] < t.ambiguity_margin and tasks[1][1] >= t.ambiguity_floor):
        a, b = tasks[0][0], tasks[1][0]
        d = Decision("clarify", render(policy.prompts["clarify"], {"a": policy.label(a), "b": policy.label(b)}),
                     reason="ambiguous", options=(a, b))
        if _same_choice_again(state, d) and _reaches_failure_limit(policy, state):
            # asked which one, answered as unclearly again, turn after turn: a person sorts it out
            return _escalate_failures(policy, state)
        return d
    if conf >= policy.accept_for(top):
        return _act(policy, state, top, u.slots, "accepted")
    if conf >= policy.confirm_for(top) and top in policy.intents:
        kind = policy.intents[top].action.type
        if kind in ("affirm", "deny"):  # an unsure yes/no: ask the pending question again, if any
            return _reask(policy, state, "low_confidence", "slot_retry") or _fail(policy, state, "no_context",
                                                                                  "no_context")
        if kind in ("repeat", "out_of_scope"):  # no point asking "you'd like to hear that again?"
            return _act(policy, state, top, u.slots, "accepted")
        return _confirm(policy, top, _intent_slots(policy, top, u.slots))
    return _reask(policy, state, "low_confidence", "slot_retry") or _fail(policy, state, "low_confidence", "reprompt")


def _asked_anything_else(state: CallState) -> bool:
    """The bot's last words served a request and ended in a question ("... Anything else?")."""
    last = state.last
    return (last is not None and last.action == "answer" and last.intent is not None
            and last.prompt.rstrip().endswith("?"))


def _asked_what_else(policy: Policy, state: CallState) -> bool:
    """The bot asked "What else can I help you with?" after a "yes" to "Anything else?" (or said it again)."""
    last = state.last
    return (last is not None and last.action == "answer" and last.intent is None
            and (last.reason == "anything_else" or (last.reason == "repeat" and last.prompt == (
                policy.prompts.get("anything_else") or policy.prompts["no_context"]))))


def _goodbye(policy: Policy) -> Decision:
    """The caller is done: the hang-up intent's own prompt (as if they had said goodbye), else `goodbye`."""
    bye = policy.intent_of_type("hangup")
    key = (policy.intents[bye].action.prompt if bye is not None else None) or "goodbye"
    return Decision("hangup", policy.prompts[key], reason="goodbye", intent=bye)


def _confirm(policy: Policy, intent: str, slots: Mapping[str, Any]) -> Decision:
    spec = policy.intents[intent]
    template = policy.prompts[spec.confirm_prompt or "confirm"]
    text = render(template, {**slots, "intent": policy.label(intent)})
    return Decision("confirm", text, reason="confirm_requested", intent=intent, slots=dict(slots))


def _intent_slots(policy: Policy, intent: str, slots: Mapping[str, Any]) -> dict[str, Any]:
    allowed = policy.intents[intent].slots if intent in policy.intents else []
    return {k: v for k, v in slots.items() if k in allowed}


def _values_instead(policy: Policy, pc: Pending, u: Understanding) -> dict[str, Any]:
    """The values this turn gives instead of the ones read back (pc), for the slots the request collects.

    A value said once and different from the one read back ("No, fifty two dollars"); the rejected value heard
    again is no new value. A slot said with several values is read from its candidates only (the engine's one
    value may be the rejected one): "No, fifty, not fifteen" to "That's 15 dollars, right?" names the value
    read back, so the other one is the correction; without the read-back value among them the turn says
    nothing about which one is meant (the values are asked for again). "Yes, Tuesday, not Thursday" to
    "Tuesday, right?" is a yes."""
    collect = policy.intents[pc.intent or ""].action.collect
    fixed = {k: v for k, v in u.slots.items()
             if k in collect and k not in u.slot_candidates and pc.slots.get(k) != v}
    if fixed or (u.intent is not None and u.intent == policy.intent_of_type("affirm")):
        return fixed
    for k, heard in u.slot_candidates.items():
        if k not in collect or k not in pc.slots:
            continue
        others = {v for v in heard if v != pc.slots[k]}
        if len(others) == 1 and len(others) < len(set(heard)):
            fixed[k] = others.pop()
    return fixed


def _missing_slots(policy: Policy, intent: str, have: Mapping[str, Any]) -> list[str]:
    return [s for s in policy.intents[intent].action.collect if s not in have]


def _act(policy: Policy, state: CallState, intent: str, slots: Mapping[str, Any], reason: str) -> Decision:
    """Carry out an intent's action (the caller's meaning is settled)."""
    if intent not in policy.intents:  # an engine label the policy does not know: treat as not understood
        return _fail(policy, state, "out_of_scope", "out_of_scope")
    spec = policy.intents[intent]
    action = spec.action
    slots = _intent_slots(policy, intent, slots)
    esc = policy.escalation
    if intent == esc.agent_request.intent:
        return _route(policy, state, esc.agent_request.queue, "agent_requested", esc.agent_request.prompt,
                      intent=intent)
    if (rule := policy.sensitive_rule(intent)) is not None:
        return _route(policy, state, rule.queue, "sensitive_intent", rule.prompt, intent=intent, slots=slots,
                      queue_prompt=True)
    if action.type == "transfer" and action.queue:
        return _route(policy, state, action.queue, reason, action.prompt, intent=intent, slots=slots,
                      queue_prompt=True)
    if action.type == "answer":
        return Decision("answer", render(policy.prompts[action.prompt or ""], slots), reason=reason, intent=intent,
                        slots=slots)
    if action.type == "hangup":
        return Decision("hangup", render(policy.prompts[action.prompt or "goodbye"], slots), reason="goodbye",
                        intent=intent, slots=slots)
    if action.type == "collect":
        earlier = {k: v for k, v in state.offered.items() if k in action.collect and k not in slots}
        if earlier and action.read_back:  # said turns ago, for no question: read back before acting on it
            slots = {**earlier, **slots}
        return _collect(policy, state, intent, slots, reason)
    if action.type == "repeat":
        if state.last is None or state.last.action in ENDING_ACTIONS:
            return _fail(policy, state, "no_context", "no_context")
        return dataclasses.replace(state.last, reason="repeat")
    if action.type == "out_of_scope":
        return _fail(policy, state, "out_of_scope", "out_of_scope")
    return _fail(policy, state, "no_context", "no_context")  # affirm/deny with nothing to confirm


def _collect(policy: Policy, state: CallState, intent: str, slots: Mapping[str, Any], reason: str) -> Decision:
    action = policy.intents[intent].action
    missing = _missing_slots(policy, intent, slots)
    if missing:
        return Decision("collect", policy.prompts[action.ask[missing[0]]], reason="slot_missing", intent=intent,
                        slots=dict(slots))
    if action.read_back:
        return _read_back(policy, intent, slots)
    return _done(policy, intent, slots, reason)


def _done(policy: Policy, intent: str, slots: Mapping[str, Any], reason: str) -> Decision:
    """A collect intent carried out with every value it needs."""
    action = policy.intents[intent].action
    return Decision("answer", render(policy.prompts[action.prompt or ""], slots), reason=reason, intent=intent,
                    slots=dict(slots))


def _read_back(policy: Policy, intent: str, slots: Mapping[str, Any]) -> Decision:
    """Read the collected values back before acting on them: slot values are misheard far more often than
    intents (a dropped "fifty" turns 552 dollars into 502), and a payment should not move on a guess."""
    key = policy.intents[intent].action.read_back
    assert key is not None
    return Decision("confirm", render(policy.prompts[key], slots), reason="read_back", intent=intent,
                    slots=dict(slots))


def _reask_values(policy: Policy, state: CallState, intent: str, slots: Mapping[str, Any]) -> Decision:
    """A "no" to the read-back: ask for the read-back values again, keeping the intent. A failed turn,
    so a caller who keeps saying no reaches a person."""
    if _reaches_failure_limit(policy, state):
        return _escalate_failures(policy, state)
    action = policy.intents[intent].action
    kept = {k: v for k, v in slots.items() if k not in action.collect}
    first = action.collect[0]
    text = _join(policy.prompts.get("value_denied", ""), policy.prompts[action.ask[first]])
    return Decision("collect", text, reason="value_denied", intent=intent, slots=kept)
