"""Threshold tuning (the "preference" stage): replay engine outputs through decide() at a grid of
(accept, confirm) thresholds and pick the pair with the lowest expected cost.

Each evaluation turn is decided on its own, from a fresh call state (yes/no turns with a pending
confirmation, since that is the only place they mean anything). Business hours are ignored and, by
default, caller-state cues are dropped: the thresholds govern the intent decision, and frustration
transfers do not depend on them. A turn's outcome is one of:
  accepted      the bot acted on an intent without asking (correct or wrong against the gold label)
  clarification the bot asked (confirm or "A or B?")
  escalation    the bot could not resolve the turn (a reprompt: a failed turn, the path to an agent)
expected cost = cost_wrong * wrong_action_rate + cost_clarify * clarification_rate
              + cost_escalate * escalation_rate
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from dataclasses import dataclass
from typing import Any, Iterable

from engine.types import Understanding
from policies.decide import CallState, Pending, decide
from policies.decision import Decision
from policies.replay import Record
from policies.schema import Policy, Thresholds

ACCEPT_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
CONFIRM_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TARGET = {"accepted_accuracy": 0.99, "acceptance_rate": 0.85}
TASK_ACTIONS = ("answer", "collect", "transfer", "hangup")
_NOW = dt.datetime(2026, 1, 5, 12, 0, tzinfo=dt.timezone.utc)  # fixed: decide stays deterministic


@dataclass(frozen=True)
class Costs:
    wrong: float = 10.0
    clarify: float = 1.0
    escalate: float = 4.0


def _open_policy(policy: Policy, accept: float | None = None, confirm: float | None = None) -> Policy:
    """The policy with every queue open (hours are not what is being tuned) and, when given,
    global thresholds in place of the policy's (per-intent overrides dropped)."""
    queues = {n: q.model_copy(update={"hours": None, "out_of_hours": None}) for n, q in policy.queues.items()}
    update: dict[str, Any] = {"queues": queues}
    if accept is not None and confirm is not None:
        update["thresholds"] = Thresholds(**{**policy.thresholds.model_dump(), "accept": accept, "confirm": confirm,
                                             "overrides": {}})
    return policy.model_copy(update=update)


def _context(policy: Policy, gold: str | None) -> CallState:
    """Fresh state; for yes/no turns, one with a confirmation pending, and for "say that again" turns one
    after an answer the bot gave (their only meaningful contexts: with nothing said yet there is nothing to
    repeat, and a rightly heard "say that again" would count as a failed turn)."""
    state = CallState(now=_NOW)
    kind = policy.intents[gold].action.type if gold is not None and gold in policy.intents else None
    if kind in ("affirm", "deny", "repeat"):
        task = next(n for n, i in policy.intents.items() if i.action.type == "answer")
        if kind == "repeat":
            said = Decision("answer", "?", reason="accepted", intent=task)
            return dataclasses.replace(state, last=said, turn=1)
        confirm = Decision("confirm", "?", reason="confirm_requested", intent=task)
        state = dataclasses.replace(state, pending_confirm=Pending(task), last=confirm, turn=1, stalls=1)
    return state


def outcome(policy: Policy, d: Decision, u: Understanding, gold: str | None) -> tuple[str, str | None]:
    """(category, intent acted on) for one decided turn. Turning a request down as out of scope,
    or repeating the last prompt, does nothing the caller did not ask for: when the gold label says
    otherwise that is a failed turn (escalation), not a wrong action."""
    if d.reason == "confirmed":
        return "accepted", policy.intent_of_type("affirm")
    if d.reason == "denied":
        return "accepted", policy.intent_of_type("deny")
    if d.reason == "read_back":  # the intent was taken without asking; only its values are read back
        return "accepted", d.intent
    if d.reason in ("out_of_scope", "repeat"):
        said = u.intent if d.reason == "out_of_scope" else policy.intent_of_type("repeat")
        return ("accepted", said) if said == gold else ("escalation", None)
    if d.action in ("confirm", "clarify"):
        return "clarification", None
    if d.action in TASK_ACTIONS and d.intent is not None:
        return "accepted", d.intent
    return "escalation", None  # reprompt, keypad menu, rule transfer


def evaluate(policy: Policy, records: Iterable[Record], costs: Costs = Costs(),
             keep_caller_state: bool = False) -> dict[str, Any]:
    """Rates for one policy over the records (only turns with a gold intent)."""
    n = in_scope = accepted = correct = wrong = clar = esc = accepted_in_scope = 0
    for r in records:
        if r.gold is None:
            continue  # slot-only answers carry no intent to decide
        u = r.understanding if keep_caller_state else dataclasses.replace(r.understanding, caller_state={})
        d = decide(policy, _context(policy, r.gold), u)
        cat, acted = outcome(policy, d, u, r.gold)
        n += 1
        scoped = r.gold in policy.intents and policy.intents[r.gold].action.type in TASK_ACTIONS
        in_scope += scoped
        if cat == "accepted":
            accepted += 1
            accepted_in_scope += scoped
            if acted == r.gold:
                correct += 1
            else:
                wrong += 1
        elif cat == "clarification":
            clar += 1
        else:
            esc += 1
    rate = (lambda k: k / n) if n else (lambda k: 0.0)
    row = {
        "n": n,
        "automation_rate": rate(accepted),
        "wrong_action_rate": rate(wrong),
        "clarification_rate": rate(clar),
        "escalation_rate": rate(esc),
        "accepted_accuracy": correct / accepted if accepted else 1.0,
        "acceptance_rate": accepted_in_scope / in_scope if in_scope else 0.0,
    }
    row["expected_cost"] = costs.wrong * row["wrong_action_rate"] + costs.clarify * row["clarification_rate"] \
        + costs.escalate * row["escalation_rate"]
    row["meets_target"] = bool(row["accepted_accuracy"] >= TARGET["accepted_accuracy"]
                               and row["acceptance_rate"] >= TARGET["acceptance_rate"])
    return row


def tune(policy: Policy, records: list[Record], costs: Costs = Costs(), keep_caller_state: bool = False,
         accept_grid: Iterable[float] = ACCEPT_GRID, confirm_grid: Iterable[float] = CONFIRM_GRID) -> dict[str, Any]:
    """The trade-off table over the grid, the cheapest thresholds, and the policy in use."""
    bad_costs = {k: v for k, v in dataclasses.asdict(costs).items() if not (math.isfinite(v) and v >= 0)}
    if bad_costs:  # a NaN cost compares false with everything: the "cheapest" row would be the first, accept 0.5
        raise ValueError("costs must be finite numbers >= 0, got " + ", ".join(f"{k}={v}" for k, v in bad_costs.items()))
    unknown: dict[str, list[str]] = {}
    for r in records:
        if r.gold is not None and r.gold not in policy.intents:
            unknown.setdefault(r.gold, []).append(r.audio)
    if unknown:  # such a turn can never be decided right: it would only lower every row of the table
        raise ValueError("gold intents the policy does not define (fix the labels, or tune with the policy that "
                         "has them): " + "; ".join(f"{g!r} ({len(a)} turn{'s' if len(a) > 1 else ''}, e.g. {a[0]})" for g, a in sorted(unknown.items())))
    table = []
    confirms = sorted(set(confirm_grid))
    for a in sorted(set(accept_grid)):
        for c in confirms:
            if c > a:
                continue
            row = evaluate(_open_policy(policy, a, c), records, costs, keep_caller_state)
            table.append({"accept": a, "confirm": c, **row})
    if not table or table[0]["n"] == 0:
        raise ValueError("no evaluation turns with a gold intent")
    # Cheapest first; ties go to the stricter accept (fewer wrong actions for the same cost).
    best = min(table, key=lambda r: (round(r["expected_cost"], 9), -r["accept"], -r["confirm"]))
    meeting = [r for r in table if r["meets_target"]]
    best_target = min(meeting, key=lambda r: (round(r["expected_cost"], 9), -r["accept"])) if meeting else None
    t = policy.thresholds
    current = {"accept": t.accept, "confirm": t.confirm,
               "overrides": {k: v.model_dump(exclude_none=True) for k, v in t.overrides.items()},
               **evaluate(_open_policy(policy), records, costs, keep_caller_state)}
    return {
        "n": table[0]["n"],
        "costs": dataclasses.asdict(costs),
        "target": TARGET,
        "table": table,
        "recommendation": best,
        "best_meeting_target": best_target,
        "current": current,
    }


def format_table(result: dict[str, Any]) -> str:
    cols = ("accept", "confirm", "automation_rate", "wrong_action_rate", "clarification_rate", "escalation_rate",
            "accepted_accuracy", "acceptance_rate", "expected_cost")
    heads = ("accept", "confirm", "automated", "wrong", "clarify", "escalate", "acc_accuracy", "acceptance", "cost")
    lines = ["  ".join(f"{h:>12}" for h in heads)]
    rec = result["recommendation"]
    for r in result["table"]:
        mark = " <- recommended" if r is rec or (r["accept"], r["confirm"]) == (rec["accept"], rec["confirm"]) else ""
        lines.append("  ".join(f"{r[c]:>12.4f}" if isinstance(r[c], float) else f"{r[c]:>12}" for c in cols) + mark)
    cur = result["current"]
    lines.append("")
    lines.append(f"n={result['n']}  costs={result['costs']}  target={result['target']}")
    lines.append(f"recommended: accept={rec['accept']} confirm={rec['confirm']} cost={rec['expected_cost']:.4f} "
                 f"accepted_accuracy={rec['accepted_accuracy']:.4f} acceptance_rate={rec['acceptance_rate']:.4f}")
    bt = result["best_meeting_target"]
    lines.append("cheapest meeting the target: " + (f"accept={bt['accept']} confirm={bt['confirm']}" if bt else "none"))
    lines.append(f"current policy: accept={cur['accept']} confirm={cur['confirm']} overrides={cur['overrides']} "
                 f"accepted_accuracy={cur['accepted_accuracy']:.4f} acceptance_rate={cur['acceptance_rate']:.4f} "
                 f"cost={cur['expected_cost']:.4f}")
    return "\n".join(lines)
