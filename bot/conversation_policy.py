"""One call's view of the policy: the Policy object it started with (a publish never changes a
live call), the policy layer's immutable CallState, and policies.decide.step() for every caller
input (speech, silence, keys) and system failure (engine, Redis). Pure decisions; this class only
keeps the state between them and what the human agent needs on a transfer."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Callable

from engine.types import Understanding
from policies import decide as pd
from policies.decision import Decision


MAX_CARRIED = 20  # transcript lines carried to a resumed leg (the human agent's context), the latest


def load_local_policy(path: str = "") -> Any:
    from policies.schema import load_policy

    return load_policy(path or None)


class CallPolicy:
    def __init__(self, policy: Any, version: str, info: Any = None) -> None:
        self.policy = policy
        self.version = version
        self.state = pd.CallState()
        self.prev_state: pd.CallState | None = None  # the state the last decision was taken in
        self.transcript: list[str] = []
        self.last_u: Understanding | None = None
        self.last_decision: Decision | None = None
        self.request: tuple[str, dict[str, Any]] | None = None  # the unresolved request: intent, its values
        self.heard_intent: str | None = None  # the last catalog intent the caller's words carried (not yes/no)
        # told the call's progress after every decision (kept in the call's record: a Twilio call whose stream is
        # lost carries on where it was on the worker that takes its new stream)
        self.on_change: Callable[[dict[str, Any]], None] | None = None

    @property
    def no_input_s(self) -> float:
        return float(self.policy.no_input.timeout_s)

    def _step(self, inp: Any) -> Decision:
        state = dataclasses.replace(self.state, now=dt.datetime.now(dt.timezone.utc))
        self.prev_state = state
        d, self.state = pd.step(self.policy, state, inp)
        self.last_decision = d
        self._track_request(d)
        if self.on_change is not None:
            self.on_change(self.snapshot())
        return d

    def snapshot(self) -> dict[str, Any]:
        """The call's progress as JSON-ready data: the policy state, the request in progress, what was said."""
        return {"version": self.version, "state": self.state.to_dict(), "transcript": self.transcript[-MAX_CARRIED:],
                "request": list(self.request) if self.request else None, "heard_intent": self.heard_intent}

    def restore(self, snap: Any) -> bool:
        """Carry on from another worker's snapshot of this call. Refused (False, fresh state kept) when it is not
        one, or names an intent or queue this policy does not have (a publish since: the question cannot be
        asked again as it was)."""
        try:
            state = pd.CallState.from_dict(snap["state"])
            request = snap.get("request")
            request = (str(request[0]), dict(request[1])) if request else None
            transcript = [str(t) for t in (snap.get("transcript") or [])]
            heard = snap.get("heard_intent")
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            return False
        intents = {i for i in (request[0] if request else None, heard, state.last.intent if state.last else None,
                               *(p.intent for p in (state.pending_confirm, state.pending_collect) if p),
                               state.interrupted.intent if state.interrupted else None,
                               *(state.pending_clarify or ())) if i}
        queues = {q for q in (state.pending_confirm.queue if state.pending_confirm else None,
                              state.last.target if state.last else None) if q}
        if not intents <= set(self.policy.intents) or not queues <= set(self.policy.queues):
            return False
        self.state, self.request, self.transcript, self.heard_intent = state, request, transcript, heard
        self.last_decision = state.last
        return True

    def pending_question(self) -> Decision | None:
        """The question the caller had been asked and not answered yet (a confirmation, a value, an either-or,
        the keypad menu), to ask again after the line was lost; None when nothing was pending."""
        st, last = self.state, self.state.last
        waiting = st.pending_confirm or st.pending_collect or st.pending_clarify or st.menu_active
        if last is None or not waiting or last.action not in ("confirm", "collect", "clarify", "dtmf_menu"):
            return None
        return last

    def greeting(self) -> Decision:
        return self._step(pd.CallStart())

    def on_turn(self, u: Understanding) -> Decision:
        self.last_u = u
        spec = self.policy.intents.get(u.intent or "")
        if spec is not None and spec.action.type not in ("affirm", "deny", "repeat") and u.error is None:
            self.heard_intent = u.intent  # "yes" / "no" / "say that again" tell an agent nothing about the call
        if u.transcript:
            self.transcript.append(u.transcript)
        return self._step(u)

    def on_no_input(self) -> Decision:
        return self._step(pd.NoInput())

    def on_dtmf(self, digits: str) -> Decision:
        collecting = self.state.pending_collect is not None  # keys typed as a value (an amount), not a menu choice
        d = self._step(pd.DtmfDigit(digits))
        chosen = self.policy.dtmf.options.get(digits.rstrip("#"))
        if not collecting and chosen in self.policy.intents:
            # a menu key says what the call is about as words do ("press 0: agent"), also when the decision
            # itself carries no intent (the queue is closed: a callback offer)
            self.heard_intent = chosen
        return d

    def dtmf_complete(self, digits: str) -> bool:
        """Keys typed so far already make a whole answer: a menu key (menu keys are single digits) while
        no slot question is pending (the caller may be typing a number: "100#"). Then the bot acts at once
        instead of leaving the caller in silence for the inter-digit timeout. Not while an amount is read back,
        nor at "You'd like to pay your bill?" (its amount not given yet), nor while a question about another
        request interrupted one ("You'd like to cancel?"): the caller may be typing the amount ("40#")."""
        return (len(digits) == 1 and digits in self.policy.dtmf.options and self.state.pending_collect is None
                and not pd.reads_back_keys(self.policy, self.state))

    def on_failure(self, reason: str) -> Decision:
        """Engine error/timeout or internal error -> EngineFailure; Redis down -> RedisFailure:
        the policy answers with its apology and system_error queue."""
        inp = pd.RedisFailure(reason) if reason.startswith("state") else pd.EngineFailure(reason)
        return self._step(inp)

    def end_reason(self, d: Decision) -> str:
        """Why a hangup decision ends the call, for the call's outcome. A "no" (or a goodbye) to a
        callback offer is reason `goodbye` to the policy, but the caller was not served: the queue was
        closed (the same outcome as a callback offer left unanswered)."""
        pc = self.prev_state.pending_confirm if self.prev_state is not None else None
        if d.action == "hangup" and d.reason == "goodbye" and pc is not None and pc.intent is None and pc.queue:
            return "out_of_hours"
        return d.reason or ""

    def transfer_target(self, d: Decision) -> str:
        """The policy names a queue; the bridge needs the queue's target (queue name, number, SIP URI)."""
        q = self.policy.queues.get(d.target or "")
        return str(getattr(q, "target", None) or d.target or "")

    def _track_request(self, d: Decision) -> None:
        """Remember the request the caller is in the middle of (an intent being confirmed, a value asked for or
        read back) and its values: a transfer for failures, frustration, silence, an error or an "agent" names
        no request of its own, and the human agent must not have to ask again what the call is about."""
        if d.action == "answer" and d.reason != "repeat":
            self.request = None  # served: nothing unresolved to hand over
            return
        spec = self.policy.intents.get(d.intent or "")
        if (spec is not None and spec.action.type in ("answer", "collect", "transfer")
                and d.intent != self.policy.escalation.agent_request.intent):
            self.request = (str(d.intent), dict(d.slots))

    def handoff_context(self, d: Decision) -> dict[str, Any]:
        """What the human agent receives: intent, slots, transcript, tries, failures, reason."""
        u = self.last_u
        req_intent, req_slots = self.request or (None, {})
        agent = self.policy.escalation.agent_request.intent
        intent = d.intent if d.intent not in (None, agent) else (req_intent or d.intent or self.heard_intent)
        prev = self.prev_state
        # consecutive failed turns that led here: the state after a transfer has reset its counter to 0
        failures = prev.failures + int(pd.is_failure(prev, d) or d.reason == "max_failures") if prev else 0
        return {
            "intent": intent,
            "confidence": round(u.confidence, 4) if u else None,
            "slots": {**dict(self.state.offered), **dict(self.state.collected), **req_slots, **dict(d.slots)}
            or (dict(u.slots) if u else {}),
            "transcript": list(self.transcript),
            "tries": self.state.turn,
            "failures": failures,
            "reason": d.reason,
            "queue": d.target,
            "caller_state": dict(u.caller_state) if u else {},
            "policy_version": self.version,
        }
