"""The policy document: a pydantic schema, cross-reference checks, and errors that point at YAML lines.

`load_policy(path)` / `parse_policy(text)` return a frozen `Policy` or raise `PolicyError`, whose
`.errors` is a list of {line, column, field, message} an admin console can show next to the text.
A load never touches a policy already in use: every load builds new objects.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator)

from ops.logs import get_logger
from ops.metrics import ERRORS

log = get_logger("policies.schema")

DEFAULT_POLICY_PATH = Path(__file__).with_name("default.yaml")

# Prompt keys decide() relies on; a policy missing any of them is rejected.
REQUIRED_PROMPTS = (
    "greeting",  # call start
    "filler",  # "One moment." while something slow happens
    "apology",  # engine/Redis failure, said before the transfer
    "reprompt",  # low confidence: "Sorry, I didn't catch that..."
    "confirm",  # "You'd like to {intent}, is that right?"
    "clarify",  # "Is this about {a} or {b}?"
    "denied",  # after a "no" to a confirmation
    "no_context",  # "yes"/"no" with nothing to confirm
    "out_of_scope",  # a request this line does not handle
    "no_input",  # silence reprompt
    "transfer",  # default transfer announcement
    "goodbye",
)
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
ActionType = Literal["answer", "collect", "transfer", "hangup", "affirm", "deny", "repeat", "out_of_scope"]
_SPAN = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")
_PLACEHOLDER = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}")


def _lenient(info: ValidationInfo) -> bool:
    """Loading a version that is already published (see parse_policy's `lenient`)."""
    return bool(info.context and info.context.get("lenient"))


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # YAML reads yes/no/on/off/true/false as booleans and pydantic would quietly take them as 1/0:
        # `accept: yes` must not become a threshold of 1.0 that the admin never wrote.
        if isinstance(v, bool) and info.field_name is not None and not _lenient(info):
            ann = cls.model_fields[info.field_name].annotation
            if ann in (int, float, int | None, float | None):
                raise ValueError(f"{str(v).lower()} is not a number (YAML reads yes/no/on/off as true/false)")
        return v


Prob = Field(ge=0.0, le=1.0)


class IntentAction(_Model):
    """answer: say `prompt`, keep listening. collect: ask for each slot in `collect` (prompts in `ask`),
    then say `prompt`. transfer: hand to `queue`. hangup: say `prompt`, end the call.
    affirm/deny/repeat/out_of_scope: the dialog's own intents (yes, no, say that again, not handled).
    read_back (collect only): a prompt key; the collected values are read back with it as a yes/no
    question before the bot acts ("That's a payment of {amount} dollars, is that right?"); "no" asks
    for them again."""

    type: ActionType
    prompt: str | None = None
    queue: str | None = None
    collect: list[str] = Field(default_factory=list)
    ask: dict[str, str] = Field(default_factory=dict)
    read_back: str | None = None


class ThresholdOverride(_Model):
    accept: float | None = Field(default=None, ge=0.0, le=1.0)
    confirm: float | None = Field(default=None, ge=0.0, le=1.0)


class Intent(_Model):
    description: str
    examples: list[str] = Field(default_factory=list)  # owned by the engine (training data)
    slots: list[str] = Field(default_factory=list)  # owned by the engine (slots it may carry)
    label: str | None = None  # short phrase for confirm/clarify prompts ("pay your bill")
    confirm_prompt: str | None = None  # prompt key overriding `confirm` (e.g. to mention {amount})
    action: IntentAction


class SlotDef(_Model):
    type: Literal["money", "day", "digits"]
    description: str = ""


class Thresholds(_Model):
    accept: float = Field(default=0.85, ge=0.0, le=1.0)  # act without asking at or above this
    confirm: float = Field(default=0.5, ge=0.0, le=1.0)  # confirm band: [confirm, accept)
    ambiguity_margin: float = Field(default=0.1, ge=0.0, le=1.0)  # top two within this -> ask which
    ambiguity_floor: float = Field(default=0.2, ge=0.0, le=1.0)  # runner-up must reach this to be a candidate
    context_accept: float = Field(default=0.5, ge=0.0, le=1.0)  # yes/no, clarify answer, slot-only answers
    overrides: dict[str, ThresholdOverride] = Field(default_factory=dict)


class Rule(_Model):
    queue: str
    prompt: str | None = None  # announcement before the transfer (default prompt `transfer`)


class AgentRule(Rule):
    intent: str


class SensitiveRule(Rule):
    intent: str


class FailureRule(Rule):
    count: int = Field(default=3, ge=1, le=20)  # consecutive failed turns -> transfer
    max_stalled_turns: int = Field(default=6, ge=1, le=50)  # turns without any outcome -> transfer


class FrustrationRule(Rule):
    threshold: float = Field(default=0.7, ge=0.0, le=1.0)


class Escalation(_Model):
    agent_request: AgentRule
    max_failures: FailureRule
    sensitive: list[SensitiveRule] = Field(default_factory=list)
    frustration: FrustrationRule
    system_error: Rule  # engine or Redis failure: apology, then this queue


class NoInput(_Model):
    timeout_s: float = Field(default=6.0, gt=0.0, le=120.0)  # silence before a no-input event
    max: int = Field(default=2, ge=1, le=10)  # consecutive no-inputs before `then`
    then: Literal["transfer", "hangup"] = "hangup"
    queue: str | None = None  # for then: transfer
    prompt: str = "no_input"
    final_prompt: str = "goodbye"  # for then: hangup


class Dtmf(_Model):
    enabled: bool = True
    after_failures: int = Field(default=2, ge=1, le=20)  # offer the keypad menu after this many failures
    prompt: str = "dtmf_menu"
    options: dict[str, str] = Field(default_factory=dict)  # digit -> intent

    @field_validator("options")
    @classmethod
    def _digits(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if k not in "0123456789*#" or len(k) != 1]
        if bad:
            raise ValueError(f"menu keys must be single keypad digits, got {bad}")
        return v


def _span_minutes(s: str) -> tuple[int, int]:
    m = _SPAN.match(s)
    assert m is not None  # validated by _check_span
    start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    # "...-23:59" is how admins write "until the end of the day": a caller at 23:59:30 on a queue written
    # "00:00-23:59" must not be told it is closed (23:59 exactly is never a real closing time)
    return start, 24 * 60 if end == 23 * 60 + 59 else end


def _check_span(s: str) -> str:
    m = _SPAN.match(s)
    if m and (int(m[3]), int(m[4])) <= (int(m[1]), int(m[2])):
        raise ValueError(f"{s!r} is not an opening span: it ends before it starts (a span over midnight is "
                         f"written as two, e.g. '{m[1]}:{m[2]}-24:00' on one day and '00:00-{m[3]}:{m[4]}' "
                         "on the next)")
    if not m or (m[3] == "24" and m[4] != "00"):
        raise ValueError(f"{s!r} is not an opening span like '08:00-17:30' (HH:MM-HH:MM, 24-hour clock, "
                         "start before end, 00:00-24:00)")
    return s


def _check_day(spans: list[str], info: ValidationInfo) -> list[str]:
    # Overlapping spans of one day are almost always a typo (the admin meant another day or time).
    if _lenient(info):
        return spans
    mins = sorted((_span_minutes(s), s) for s in spans)
    for (a, sa), (b, sb) in zip(mins, mins[1:]):
        if b[0] < a[1]:
            raise ValueError(f"opening spans {sa!r} and {sb!r} overlap")
    return spans


def _spans_list(v: Any) -> Any:
    if isinstance(v, str):  # `mon: "08:00-17:00"`: pydantic would only say "Input should be a valid list"
        raise ValueError(f"a day's opening spans are a list: write [{v!r}]")
    return v


def _holiday(v: Any, info: ValidationInfo) -> Any:
    # YAML reads 2026-12-25 as a date; anything else reaching here was written some other way
    if isinstance(v, dt.datetime) and v.time() != dt.time(0):
        raise ValueError(f"a holiday is a whole day: write the date alone ({v.date().isoformat()})")
    if isinstance(v, str) and not _lenient(info) and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", v.strip()):
        raise ValueError(f"holiday {v!r} is not a date written YYYY-MM-DD (e.g. 2026-12-25); a holiday that "
                         "comes back every year is listed once per year")
    return v


def _holidays_list(v: Any) -> Any:
    if isinstance(v, (dt.date, str)):  # `holidays: 2026-12-25`
        raise ValueError(f"holidays are a list of dates: write [{v}]")
    return v


Span = Annotated[str, AfterValidator(_check_span)]
DaySpans = Annotated[list[Span], BeforeValidator(_spans_list), AfterValidator(_check_day)]
Holidays = Annotated[list[Annotated[dt.date, BeforeValidator(_holiday)]], BeforeValidator(_holidays_list)]


@functools.lru_cache(maxsize=1)
def _zone_names() -> dict[str, str]:
    """IANA zone names by lower-case spelling (for "did you mean"); read once, only when a zone is wrong."""
    return {n.lower(): n for n in available_timezones()}


def _zone_hint(name: str) -> str:
    near = _zone_names().get(name.strip().lower().replace(" ", "_"))
    if near is not None and near != name:
        return f" (did you mean {near!r}?)"
    return " (use an IANA zone name like 'America/New_York', 'Europe/London' or 'Australia/Sydney')"


# Zone names that exist on disk but are no place: "localtime" is whatever the host is set to.
_NOT_PLACES = frozenset({"localtime", "posixrules", "Factory"})


# Opening hours are wall-clock times of `timezone`: a span means the same local times all year, across DST
# changes (an hour skipped in spring is never open; an hour repeated in autumn is open both times). No spans
# at all (`weekly: {}`) is a queue closed every day, e.g. a line shut for now: its out-of-hours plan answers.
# A comment, not a docstring: a docstring would change the committed JSON schema (policies/policy.schema.json).
class Hours(_Model):
    timezone: str = "UTC"
    weekly: dict[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"], DaySpans] = Field(default_factory=dict)
    holidays: Holidays = Field(default_factory=list)  # whole days closed, as dates in `timezone`

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str, info: ValidationInfo) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError, OSError) as exc:  # OSError: a folder such as "America"
            raise ValueError(f"unknown timezone {v!r}{_zone_hint(v)}") from exc
        if v in _NOT_PLACES and not _lenient(info):
            raise ValueError(f"timezone {v!r} is not a place (it follows whatever the server is set to); "
                             "use an IANA zone name like 'America/New_York'")
        return v

    def _local(self, now: dt.datetime) -> dt.datetime:
        if now.tzinfo is None:
            now = now.replace(tzinfo=dt.timezone.utc)
        return now.astimezone(ZoneInfo(self.timezone))

    def is_open(self, now: dt.datetime) -> bool:
        """Open at `now` (an aware datetime; naive ones are taken as UTC)."""
        local = self._local(now)
        if local.date() in self.holidays:
            return False
        minute = local.hour * 60 + local.minute
        for s in self.weekly.get(WEEKDAYS[local.weekday()], []):
            start, end = _span_minutes(s)
            if start <= minute < end:
                return True
        return False

    def next_opening(self, now: dt.datetime, horizon_days: int = 400) -> dt.datetime | None:
        """The first moment after `now` at which the queue is open, in the queue's zone (None: never within
        `horizon_days`). A span starting in a skipped DST hour opens when the clocks jump; one starting in a
        repeated hour opens at its first occurrence still ahead of `now`."""
        local = self._local(now)
        now = local.astimezone(dt.timezone.utc)
        tz = ZoneInfo(self.timezone)
        for i in range(horizon_days):
            day = local.date() + dt.timedelta(days=i)
            if day in self.holidays:
                continue
            for start in sorted(_span_minutes(s)[0] for s in self.weekly.get(WEEKDAYS[day.weekday()], [])):
                wall = dt.datetime(day.year, day.month, day.day, start // 60, start % 60)
                first, second = sorted((wall.replace(tzinfo=tz, fold=f).astimezone(dt.timezone.utc) for f in (0, 1)))
                # Folds differ only around a DST change (a gap or a repeat): walk its minutes for the real opening.
                t = first
                while t <= second:
                    if t > now and self.is_open(t):
                        return t.astimezone(tz)
                    t += dt.timedelta(minutes=1)
        return None


class OutOfHours(_Model):
    """message: say `prompt` and end the call. callback: offer a callback (yes/no). queue: try `queue`."""

    action: Literal["message", "callback", "queue"]
    prompt: str | None = None
    queue: str | None = None


class Queue(_Model):
    target: str  # what the bridge dials: a Twilio queue/number, a SIP URI
    description: str = ""
    prompt: str | None = None  # transfer announcement for this queue
    hours: Hours | None = None  # None: always open
    out_of_hours: OutOfHours | None = None


class Policy(_Model):
    name: str
    description: str = ""
    greeting: str = "greeting"  # prompt key
    slots: dict[str, SlotDef] = Field(default_factory=dict)
    intents: dict[str, Intent]
    thresholds: Thresholds = Field(default_factory=Thresholds)
    escalation: Escalation
    no_input: NoInput = Field(default_factory=NoInput)
    dtmf: Dtmf = Field(default_factory=Dtmf)
    queues: dict[str, Queue]
    prompts: dict[str, str]

    # -- lookups decide() uses ---------------------------------------------------------------
    def accept_for(self, intent: str | None) -> float:
        o = self.thresholds.overrides.get(intent or "")
        return o.accept if o and o.accept is not None else self.thresholds.accept

    def confirm_for(self, intent: str | None) -> float:
        o = self.thresholds.overrides.get(intent or "")
        return o.confirm if o and o.confirm is not None else self.thresholds.confirm

    def intent_of_type(self, kind: str) -> str | None:
        return next((n for n, i in self.intents.items() if i.action.type == kind), None)

    def label(self, intent: str) -> str:
        i = self.intents.get(intent)
        return (i.label or i.description) if i else intent.replace("_", " ")

    def sensitive_rule(self, intent: str | None) -> SensitiveRule | None:
        return next((r for r in self.escalation.sensitive if r.intent == intent), None)

    def catalog_dict(self) -> dict[str, Any]:
        """Plain data for engine.catalog.Catalog.from_dict: intents' examples/slots and slot types."""
        return {
            "intents": {n: {"examples": list(i.examples), "slots": list(i.slots)} for n, i in self.intents.items()},
            "slots": {n: {"type": s.type} for n, s in self.slots.items()},
        }

    def static_prompts(self) -> list[str]:
        """Every prompt the voice can pre-render at load: texts without placeholders, the greeting,
        the filler and the apology, plus the confirm question for every intent without slot values."""
        out: list[str] = []
        for key in (self.greeting, "filler", "apology"):
            out.append(self.prompts[key])
        out += [t for t in self.prompts.values() if not _PLACEHOLDER.search(t)]
        confirm = self.prompts["confirm"]
        if set(_PLACEHOLDER.findall(confirm)) <= {"intent"}:
            out += [confirm.replace("{intent}", self.label(n)) for n, i in self.intents.items()
                    if i.action.type in ("answer", "collect", "transfer", "hangup") and not i.confirm_prompt]
        return list(dict.fromkeys(out))  # unique, order kept


# -- errors ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyIssue:
    line: int | None  # 1-based; None when the text could not be parsed far enough
    column: int | None
    field: str  # dotted path, e.g. "intents.pay_bill.action.queue"
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f"line {self.line}, col {self.column}" if self.line else "?"
        return f"{where}: {self.field or '<document>'}: {self.message}"


class PolicyError(ValueError):
    """An invalid policy. `.errors` lists every problem found, each pointing at a YAML line."""

    def __init__(self, errors: list[PolicyIssue], source: str = "<policy>") -> None:
        self.errors = errors
        self.source = source
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(f"  {e}" for e in errors))
        # Every rejected policy is logged and counted, whoever loaded it (CLI, store, bot start).
        ERRORS.labels(component="policy", kind="invalid_policy").inc()
        log.warning("policy_rejected", source=source, errors=[str(e) for e in errors[:20]], count=len(errors))

    def to_list(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.errors]


Path_ = tuple[str | int, ...]


def _locate(root: yaml.Node | None, path: Path_) -> tuple[int | None, int | None]:
    """Walk the composed YAML node tree along `path`; the deepest node reached gives the line.
    A mapping key points at the key itself (where the field is written)."""
    node, mark = root, root.start_mark if root is not None else None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if hit is None:
                break
            mark, node = hit[0].start_mark, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            mark = node.start_mark
        else:
            break
    if mark is None:
        return None, None
    return mark.line + 1, mark.column + 1


def _issue(root: yaml.Node | None, path: Path_, message: str) -> PolicyIssue:
    line, col = _locate(root, path)
    return PolicyIssue(line, col, ".".join(str(p) for p in path), message)


def _semantic_errors(p: Policy, lenient: bool = False) -> list[tuple[Path_, str]]:
    """Cross-references pydantic cannot see: unknown intents/queues/prompts/slots, bands, cycles.
    `lenient` skips the checks that only protect callers from an admin's slip (placeholders, empty
    targets): decide() works without them, so a version published before they existed still loads."""
    errs: list[tuple[Path_, str]] = []
    t = p.thresholds

    def need_prompt(key: str | None, path: Path_) -> None:
        if key is not None and key not in p.prompts:
            errs.append((path, f"missing prompt {key!r} (not defined under prompts)"))

    def need_queue(name: str | None, path: Path_) -> None:
        if name is None:
            errs.append((path, "a queue is required here"))
        elif name not in p.queues:
            errs.append((path, f"unreachable queue {name!r} (not defined under queues)"))

    def need_intent(name: str, path: Path_) -> None:
        if name not in p.intents:
            errs.append((path, f"unknown intent {name!r}"))

    for key in REQUIRED_PROMPTS:
        if key not in p.prompts and key != "greeting":
            errs.append((("prompts",), f"missing prompt {key!r} (required)"))
    # The voice refuses text with nothing to say or longer than it renders (engine.voice.clean_text): a
    # prompt like that would reach the caller as the apology, so it is refused here, where the admin sees it.
    max_chars = int(os.environ.get("BOT_VOICE_MAX_CHARS", "1000"))
    for key, text in p.prompts.items():
        spoken = _PLACEHOLDER.sub("1", text)
        if not re.search(r"[^\W_]", spoken):
            errs.append((("prompts", key), f"prompt {key!r} has nothing the voice can say (letters or digits)"))
        elif len(spoken) > max_chars:
            errs.append((("prompts", key), f"prompt {key!r} is {len(spoken)} characters; the voice renders at most "
                                           f"{max_chars} (BOT_VOICE_MAX_CHARS)"))
    need_prompt(p.greeting, ("greeting",))
    if t.confirm > t.accept:
        errs.append((("thresholds", "confirm"), f"confirm band floor {t.confirm} is above accept {t.accept}"))
    for name, o in t.overrides.items():
        need_intent(name, ("thresholds", "overrides", name))
        acc = o.accept if o.accept is not None else t.accept
        con = o.confirm if o.confirm is not None else t.confirm
        if con > acc:
            errs.append((("thresholds", "overrides", name, "confirm"), f"confirm band floor {con} is above accept {acc}"))
    for kind in ("affirm", "deny"):
        if p.intent_of_type(kind) is None:
            errs.append((("intents",), f"no intent with action type {kind!r} (needed to confirm)"))
    for name, intent in p.intents.items():
        base: Path_ = ("intents", name)
        for s in intent.slots:
            if s not in p.slots:
                errs.append((base + ("slots",), f"unknown slot {s!r} (not defined under slots)"))
        a = intent.action
        ap = base + ("action",)
        if a.type in ("answer", "hangup", "collect") and a.prompt is None:
            errs.append((ap, f"action {a.type!r} needs a prompt"))
        need_prompt(a.prompt, ap + ("prompt",))
        need_prompt(intent.confirm_prompt, base + ("confirm_prompt",))
        if a.type == "transfer":
            need_queue(a.queue, ap + ("queue",))
        elif a.queue is not None:
            errs.append((ap + ("queue",), f"action {a.type!r} takes no queue"))
        if a.type == "collect":
            if not a.collect:
                errs.append((ap, "action 'collect' needs a `collect` list of slots"))
            for s in a.collect:
                if s not in intent.slots:
                    errs.append((ap + ("collect",), f"slot {s!r} is not one of this intent's slots {intent.slots}"))
                if s not in a.ask:
                    errs.append((ap + ("ask",), f"no prompt to ask for slot {s!r}"))
        for s, key in a.ask.items():
            need_prompt(key, ap + ("ask", s))
        if a.read_back is not None:
            if a.type != "collect":
                errs.append((ap + ("read_back",), f"action {a.type!r} collects nothing to read back (collect only)"))
            need_prompt(a.read_back, ap + ("read_back",))
        for field_name in ("prompt", "read_back"):
            key = getattr(a, field_name)
            if key in p.prompts:
                unknown = set(_PLACEHOLDER.findall(p.prompts[key])) - set(intent.slots)
                if unknown:
                    errs.append((ap + (field_name,), f"prompt {key!r} uses {sorted(unknown)}, not slots of {name!r}"))
    if not lenient:
        _placeholder_errors(p, errs)
    e = p.escalation
    for rule, path in ((e.agent_request, ("escalation", "agent_request")), (e.max_failures, ("escalation", "max_failures")),
                       (e.frustration, ("escalation", "frustration")), (e.system_error, ("escalation", "system_error"))):
        need_queue(rule.queue, path + ("queue",))
        need_prompt(rule.prompt, path + ("prompt",))
    need_intent(e.agent_request.intent, ("escalation", "agent_request", "intent"))
    for i, r in enumerate(e.sensitive):
        need_intent(r.intent, ("escalation", "sensitive", i, "intent"))
        need_queue(r.queue, ("escalation", "sensitive", i, "queue"))
        need_prompt(r.prompt, ("escalation", "sensitive", i, "prompt"))
    n = p.no_input
    need_prompt(n.prompt, ("no_input", "prompt"))
    need_prompt(n.final_prompt, ("no_input", "final_prompt"))
    if n.then == "transfer":
        need_queue(n.queue, ("no_input", "queue"))
    if p.dtmf.enabled:
        need_prompt(p.dtmf.prompt, ("dtmf", "prompt"))
        if not p.dtmf.options:
            errs.append((("dtmf", "options"), "an enabled keypad menu needs options"))
    for digit, name in p.dtmf.options.items():
        need_intent(name, ("dtmf", "options", digit))
    for qname, q in p.queues.items():
        qp: Path_ = ("queues", qname)
        need_prompt(q.prompt, qp + ("prompt",))
        if not lenient and not q.target.strip():
            errs.append((qp + ("target",), "a queue needs a target to dial (a Twilio queue or number, a SIP URI)"))
        if q.hours is not None and q.out_of_hours is None:
            errs.append((qp + ("hours",), "a queue with hours needs `out_of_hours` (what callers get when it is closed)"))
        if q.out_of_hours is not None:
            o = q.out_of_hours
            need_prompt(o.prompt, qp + ("out_of_hours", "prompt"))
            if o.action in ("message", "callback") and o.prompt is None:
                errs.append((qp + ("out_of_hours",), f"out_of_hours {o.action!r} needs a prompt"))
            if o.action == "queue":
                need_queue(o.queue, qp + ("out_of_hours", "queue"))
        # Follow the out-of-hours chain: a cycle of closed queues would never reach anyone.
        seen, cur = [qname], q
        while cur.out_of_hours is not None and cur.out_of_hours.action == "queue" and cur.out_of_hours.queue in p.queues:
            nxt = cur.out_of_hours.queue
            if nxt in seen:
                errs.append((qp + ("out_of_hours", "queue"), f"out-of-hours chain loops: {' -> '.join(seen + [nxt])}"))
                break
            seen.append(nxt)
            cur = p.queues[nxt]
    return errs


# Prompts decide() says exactly as written (policies/decide.py renders only action, read-back, confirm,
# clarify and transfer prompts): a {placeholder} in one of them would reach the caller unfilled.
# apology_closed stays raw: it is pre-rendered, so a system failure hitting every call never waits for the voice.
_RAW_PROMPTS = ("filler", "apology", "apology_closed", "reprompt", "denied", "no_context", "out_of_scope",
                "still_there", "slot_retry", "dtmf_invalid", "value_denied", "anything_else",
                "goodbye_unconfirmed", "resume_after_callback", "shutdown", "shutdown_transfer",
                "shutdown_transfer_failed", "max_duration", "reconnected", "reconnected_pending",
                "resumed", "resumed_pending")
# Said after a callback offer, with its closed queue known: {opens} is filled ("tomorrow at 8 a.m.").
_CLOSED_PROMPTS = ("callback_done", "callback_declined")


def _placeholder_errors(p: Policy, errs: list[tuple[Path_, str]]) -> None:
    """Every {placeholder} must be one that every place saying the prompt fills (action prompts and
    read-backs are checked with their intent in _semantic_errors)."""
    all_slots = set(p.slots)

    def check(key: str | None, path: Path_, allowed: set[str], why: str) -> None:
        if key is None or key not in p.prompts:
            return
        bad = set(_PLACEHOLDER.findall(p.prompts[key])) - allowed
        if bad:
            errs.append((path, f"prompt {key!r} uses {sorted(bad)}, {why}"))

    raw = "which this prompt never fills (it is said as written)"
    check(p.greeting, ("greeting",), set(), raw)
    for key in _RAW_PROMPTS:
        check(key, ("prompts", key), set(), raw)
    for key in _CLOSED_PROMPTS:
        check(key, ("prompts", key), {"opens"}, "but only {opens} (when the closed queue opens) is filled here")
    check(p.no_input.prompt, ("no_input", "prompt"), set(), raw)
    check(p.no_input.final_prompt, ("no_input", "final_prompt"), set(), raw)
    if p.dtmf.enabled:
        check(p.dtmf.prompt, ("dtmf", "prompt"), set(), raw)
    check("clarify", ("prompts", "clarify"), {"a", "b"}, "but a clarify question only fills {a} and {b}")
    check("confirm", ("prompts", "confirm"), {"intent"} | all_slots, "which are neither {intent} nor slots")
    check("transfer", ("prompts", "transfer"), all_slots, "which are not slots")
    for name, intent in p.intents.items():
        base: Path_ = ("intents", name)
        check(intent.confirm_prompt, base + ("confirm_prompt",), {"intent"} | set(intent.slots),
              f"which are neither {{intent}} nor slots of {name!r}")
        for s, key in intent.action.ask.items():
            check(key, base + ("action", "ask", s), set(), "but a slot question is said as written (nothing is filled)")
    e = p.escalation
    rules: list[tuple[Rule, Path_]] = [(e.agent_request, ("escalation", "agent_request")),
                                       (e.max_failures, ("escalation", "max_failures")),
                                       (e.frustration, ("escalation", "frustration")),
                                       (e.system_error, ("escalation", "system_error"))]
    rules += [(r, ("escalation", "sensitive", i)) for i, r in enumerate(e.sensitive)]
    for rule, path in rules:
        check(rule.prompt, path + ("prompt",), all_slots, "which are not slots")
    for qname, q in p.queues.items():
        check(q.prompt, ("queues", qname, "prompt"), all_slots, "which are not slots")
        o = q.out_of_hours
        if o is not None:  # a message or callback offer fills only {opens}; a move to a queue announces it
            if o.action == "queue":
                check(o.prompt, ("queues", qname, "out_of_hours", "prompt"), all_slots, "which are not slots")
            else:
                check(o.prompt, ("queues", qname, "out_of_hours", "prompt"), {"opens"},
                      "but only {opens} (when this queue opens) is filled in an out-of-hours message")


def _duplicate_keys(root: yaml.Node | None) -> list[PolicyIssue]:
    """Keys written twice in one mapping. YAML loaders silently keep the last one, so an admin who edits
    the first `accept:` of two would publish a policy that ignores the edit; and error lines (found by
    the first match) would point at the wrong one. Merge keys (`<<`) are YAML's own override mechanism."""
    out: list[PolicyIssue] = []
    seen_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, tuple[str, ...]]] = [(root, ())] if root is not None else []
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:  # aliases share nodes: visit each once
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], yaml.Node] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    key = (k.tag, k.value)
                    if key in first:
                        out.append(PolicyIssue(
                            k.start_mark.line + 1, k.start_mark.column + 1, ".".join(path + (k.value,)),
                            f"duplicate key {k.value!r} (also on line {first[key].start_mark.line + 1}); "
                            "only one may stay"))
                    else:
                        first[key] = k
                stack.append((v, path + (str(k.value),)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, path + (str(i),)) for i, v in enumerate(node.value))
    return sorted(out, key=lambda i: (i.line or 0, i.column or 0))


class _Loader(yaml.SafeLoader):
    """SafeLoader whose value errors (a date like 2026-13-45) carry the line, like syntax errors do."""

    def construct_yaml_timestamp(self, node: yaml.Node) -> Any:  # type: ignore[override]
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError as exc:
            raise yaml.constructor.ConstructorError(None, None, f"{node.value!r} is not a date: {exc}",
                                                    node.start_mark) from None


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _Loader.construct_yaml_timestamp)

MAX_POLICY_CHARS = 1_000_000  # the shipped policy is ~12 kB; parsing a megabyte already takes seconds
MAX_ISSUES = 100  # more than this helps nobody (and locating each costs time): the rest are counted
MAX_EXPANDED_CHARS = 10_000_000  # text reachable through aliases: a real policy is ~20 kB


def _expanded_size(root: yaml.Node) -> int:
    """Characters of scalar text with every alias expanded, as the validator will walk it. A few
    anchors referenced many times (a "billion laughs" document) would keep a parser thread busy."""
    sizes: dict[int, int] = {}
    order: list[yaml.Node] = []
    stack = [root]
    while stack:  # iterative post-order: nested documents must not exhaust the Python stack
        node = stack.pop()
        if id(node) in sizes:
            continue
        sizes[id(node)] = -1
        order.append(node)
        if isinstance(node, yaml.MappingNode):
            stack.extend(x for kv in node.value for x in kv)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    for node in reversed(order):
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = len(node.value) + 1
        elif isinstance(node, yaml.MappingNode):
            sizes[id(node)] = 1 + sum(sizes[id(k)] + sizes[id(v)] for k, v in node.value)
        else:
            sizes[id(node)] = 1 + sum(sizes[id(v)] for v in node.value)
        sizes[id(node)] = min(sizes[id(node)], MAX_EXPANDED_CHARS + 1)
    return sizes[id(root)]


def _deep_mark(text: str) -> yaml.Mark | None:
    """Where nesting first gets deeper than any policy needs (the parser itself is not recursive)."""
    depth = 0
    try:
        for ev in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > 50:
                    return ev.start_mark
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError:
        pass
    return None


def _read_yaml(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """(node tree, plain data) of the text, parsed once; PolicyError with a line for anything unreadable."""
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # checks every character first (ReaderError)
        root = loader.get_single_node()
        if root is None:
            return None, None
        # Before constructing: construction folds merge keys (<<) into their mapping, in place.
        dups = _duplicate_keys(root)
        if dups:
            raise PolicyError(_capped(dups, len(dups)), source)
        if _expanded_size(root) > MAX_EXPANDED_CHARS:
            raise PolicyError([PolicyIssue(1, 1, "", f"aliases (*name) expand this document to more than "
                                                     f"{MAX_EXPANDED_CHARS} characters; write the values out")], source)
        return root, loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        msg = " ".join(str(x) for x in (exc.context, exc.problem) if x) or str(exc)
        if "'\\t'" in msg:  # PyYAML names the character as '\t'
            msg += " (indent with spaces; YAML does not allow tabs there)"
        issue = PolicyIssue(mark.line + 1 if mark else None, mark.column + 1 if mark else None, "", f"invalid YAML: {msg}")
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (control characters, lone surrogates)
        ch = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        issue = PolicyIssue(line, col, "", f"invalid YAML: character {ch} is not allowed in a YAML document")
    except RecursionError:
        mark = _deep_mark(text)
        issue = PolicyIssue(mark.line + 1 if mark else None, mark.column + 1 if mark else None, "",
                            "invalid YAML: nested too deeply (a policy needs a few levels)")
    except yaml.YAMLError as exc:
        issue = PolicyIssue(None, None, "", f"invalid YAML: {exc}")
    finally:
        if loader is not None:
            loader.dispose()
    raise PolicyError([issue], source)


def _pydantic_message(err: Any) -> str:
    loc, msg, kind, value = tuple(err["loc"]), err["msg"], err["type"], err.get("input")
    if kind == "missing":
        return f"field {loc[-1]!r} is required"
    if kind == "extra_forbidden":
        return f"unknown field {loc[-1]!r}"
    if kind == "string_type" and isinstance(value, bool):
        return f"expected text, got {str(value).lower()} (YAML reads yes/no/on/off as true/false: put the text in quotes)"
    if kind == "string_type" and isinstance(value, (int, float)) and "[key]" in loc:
        return f"key {value!r} must be text: write it in quotes (\"{value}\")"
    if value is None and kind.endswith("_type"):
        return "a value is required here (it is empty)"
    if kind in ("model_type", "dict_type"):
        return f"expected a mapping (`key: value` lines), got {type(value).__name__} {str(value)[:40]!r}"
    if kind == "value_error" and msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    return msg


def _capped(issues: list[PolicyIssue], total: int) -> list[PolicyIssue]:
    """The first MAX_ISSUES of `total` problems, and a last line that counts the rest."""
    if total <= MAX_ISSUES:
        return issues
    return issues[:MAX_ISSUES] + [PolicyIssue(None, None, "", f"... and {total - MAX_ISSUES} more problems (fix these first)")]


_MISSING = object()
_SALVAGE_ROUNDS = 8  # each round drops what failed; a nested required field costs a round per level


def _prune(doc: Any, loc: tuple[Any, ...]) -> Path_ | None:
    """Delete from `doc` the deepest value `loc` reaches (for a missing field: the mapping that lacks it; inside
    a list: the whole list, so the indices of the errors that remain still match the text). Returns the path
    deleted, or None when it would be the document itself."""
    node, parent, key, path = doc, None, _MISSING, ()
    for part in loc:
        if isinstance(node, dict):
            k = part if part in node else next((k for k in node if str(k) == str(part)), _MISSING)
            if k is _MISSING:
                break
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            k = part
        else:
            break
        parent, key, node, path = node, k, node[k], path + (part,)
    if isinstance(parent, list):  # drop the list from its own parent (one level up)
        return _prune(doc, path[:-1])
    if parent is None or key is _MISSING:
        return None
    del parent[key]
    return path


def _fill(doc: Any, loc: Path_) -> bool:
    """Put an empty text where a required field is missing; False when its mapping is not there."""
    node = doc
    for part in loc[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return False
    if not isinstance(node, dict) or not loc:
        return False
    node[loc[-1]] = ""
    return True


def _salvaged_semantic_errors(doc: dict[str, Any], strict: list[Any]) -> list[tuple[Path_, str]]:
    """Cross-reference problems of a document that failed type checks: the values that failed are dropped (they
    are reported already), the rest is validated leniently and checked. A problem that only exists because of
    a drop (an intent, queue or prompt the admin did write; a field next to one that failed, such as a band
    floor compared with a default `accept`) is not reported. [] when too little survives to check."""
    work = copy.deepcopy(doc)
    pruned: list[Path_] = []
    filled: set[Path_] = set()
    # what failed the strict checks goes first, also where a lenient load would accept it: `confirm: yes` read
    # as 1.0 would be reported again as "confirm band floor 1.0 is above accept"
    for err in strict:
        if err["type"] != "missing":
            path = _prune(work, tuple(x for x in err["loc"] if x != "[key]"))
            if path is not None:
                pruned.append(path)
    loose: Policy | None = None
    for _ in range(_SALVAGE_ROUNDS):
        try:
            loose = Policy.model_validate(work, context={"lenient": True})
            break
        except ValidationError as exc:
            for err in exc.errors():
                loc = tuple(x for x in err["loc"] if x != "[key]")
                if err["type"] == "missing" and loc not in filled and _fill(work, loc):
                    # a required field left out (a rule's `queue`): a stand-in keeps the rest of its section
                    # checkable; problems with the stand-in are dropped below with the path
                    filled.add(loc)
                    pruned.append(loc)
                    continue
                path = _prune(work, loc[:-1] if err["type"] == "missing" else loc)
                if path is None:
                    return []  # a whole required section failed: nothing to cross-check against
                pruned.append(path)
    if loose is None:
        return []

    def written(section: str) -> set[str]:
        v = doc.get(section)
        return {str(k) for k in v} if isinstance(v, dict) else set()

    names = {"intent": (written("intents"), set(loose.intents)), "queue": (written("queues"), set(loose.queues)),
             "prompt": (written("prompts"), set(loose.prompts)), "slot": (written("slots"), set(loose.slots))}
    ref = re.compile(r"(?:unknown|unreachable|missing) (intent|queue|prompt|slot) '([^']*)'")

    pruned = [tuple(str(x) for x in p) for p in pruned]  # an unquoted menu key is 1 in the error, "1" in the model

    def caused_by_drop(path: Path_, msg: str) -> bool:
        path = tuple(str(x) for x in path)
        if (m := ref.search(msg)) is not None:
            have, kept = names[m[1]]
            if m[2] in have and m[2] not in kept:
                return True
        if msg.startswith("no intent with action type") and any(p[:1] == ("intents",) for p in pruned):
            return True
        if "needs `out_of_hours`" in msg:
            q = doc.get("queues", {}).get(path[1]) if len(path) > 1 and isinstance(doc.get("queues"), dict) else None
            if isinstance(q, dict) and "out_of_hours" in q:
                return True
        for p in pruned:
            if path[:len(p)] == p or p[:len(path)] == path:  # inside what was dropped, or around it
                return True
            # a band floor compared with a default that stands in for a dropped `accept`/`confirm`
            if "confirm band" in msg and p[-1] in ("accept", "confirm") and (
                    p[:-1] == path[:-1] or p[:-1] == ("thresholds",)):
                return True
            # anything else in the same intent or queue (its slots, prompts, collect list judged without the
            # dropped part would be guesses)
            if len(p) >= 3 and p[0] in ("intents", "queues") and path[:2] == p[:2]:
                return True
        return False

    return [(path, msg) for path, msg in _semantic_errors(loose) if not caused_by_drop(path, msg)]


def parse_policy(text: str, source: str = "<policy>", *, lenient: bool = False) -> Policy:
    """Validate policy YAML text into a new frozen Policy, or raise PolicyError with line numbers.

    `lenient=True` is for loading a version that was already published (a worker following the store):
    the checks added to catch admins' slips (YAML booleans as numbers, overlapping opening spans,
    unfilled placeholders, empty queue targets) are skipped, so a release with stricter validation never
    leaves a worker without the live policy. Publishing, rollback and `bot policy validate` are strict."""
    if len(text) > MAX_POLICY_CHARS:
        raise PolicyError([PolicyIssue(1, 1, "", f"the policy is {len(text)} characters; at most {MAX_POLICY_CHARS} are "
                                                 "accepted")], source)
    root, doc = _read_yaml(text, source)
    if not isinstance(doc, dict):
        raise PolicyError([PolicyIssue(1, 1, "", "a policy must be a YAML mapping")], source)
    try:
        policy = Policy.model_validate(doc, context={"lenient": lenient})
    except ValidationError as exc:
        issues = [_issue(root, tuple(x for x in err["loc"] if x != "[key]"), _pydantic_message(err))
                  for err in exc.errors()[:MAX_ISSUES]]  # dict keys' errors point at the key itself
        total = exc.error_count()
        if not lenient:
            # The cross-reference problems are listed in the same go, also after a type error elsewhere: an admin
            # who fixes `accept: "high"` must not find an unknown intent only on the next try.
            errs = _salvaged_semantic_errors(doc, exc.errors())
            issues += [_issue(root, path, msg) for path, msg in errs[:MAX_ISSUES]]
            total += len(errs)
            issues.sort(key=lambda i: (i.line or 0, i.column or 0))
        raise PolicyError(_capped(issues, total), source) from None
    errs = _semantic_errors(policy, lenient)
    if errs:
        raise PolicyError(_capped([_issue(root, path, msg) for path, msg in errs[:MAX_ISSUES]], len(errs)), source)
    return policy


def load_policy(path: str | Path | None = None) -> Policy:
    """Load and validate a policy file (default: policies/default.yaml)."""
    p = Path(path) if path else DEFAULT_POLICY_PATH
    try:
        with p.open("rb") as f:  # bounded: `bot policy validate /dev/zero` must not read forever
            data = f.read(4 * MAX_POLICY_CHARS + 1)
    except OSError as exc:
        raise PolicyError([PolicyIssue(None, None, "", f"cannot read policy: {exc.strerror or exc}")], str(p)) from None
    if len(data) > 4 * MAX_POLICY_CHARS:
        raise PolicyError([PolicyIssue(1, 1, "", f"the file is larger than {4 * MAX_POLICY_CHARS} bytes; a policy is "
                                                 f"at most {MAX_POLICY_CHARS} characters")], str(p))
    return parse_policy(decode_policy(data, str(p)), source=str(p))


def decode_policy(data: bytes, source: str = "<policy>") -> str:
    """UTF-8 text of a policy file; PolicyError at the line of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8-sig")  # an editor's byte-order mark is not an error
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PolicyError([PolicyIssue(line, col, "", f"byte 0x{data[exc.start]:02x} is not UTF-8: save the file as "
                                                       "UTF-8")], source) from None


def validate_text(text: str) -> list[PolicyIssue]:
    """Every problem in a policy text (empty list: valid). For editors and the admin console."""
    try:
        parse_policy(text)
    except PolicyError as exc:
        return exc.errors
    return []


def json_schema() -> dict[str, Any]:
    """JSON Schema of the policy document (for editors; committed as policies/policy.schema.json)."""
    schema = Policy.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Voicebot policy"
    return schema
