"""One call's conversation, transport-neutral: it consumes a telephony.bridge.CallBridge, so
Twilio, SIP and WebRTC calls all run exactly this code.

Flow: greeting (pre-rendered, sent at once) -> caller audio -> batched VAD -> TurnDetector ->
end-of-turn head -> engine.understand -> policy -> voice (streamed, paced by the bridge, marked
every ~200 ms so we know what the caller actually heard). Barge-in clears the bridge; long
processing gets a filler; any engine failure gets an apology and a transfer, never silence.
Every step lands in the call's Redis event stream (bot/state.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Mapping

import numpy as np
import structlog

from bot.conversation_audio import CallerAudio, level_dbfs, render
from bot.conversation_policy import CallPolicy
from bot.state import CallStore, call_key, finite_float
from bot.turns import TurnDetector, TurnEvent, TurnParams
from bot.turns_vad import BatchedVad
from engine.types import Understanding
from ops import metrics
from ops.logs import get_logger, mask_digits
from policies.decision import Decision
from telephony.bridge import AudioIn, CallBridge, CallEnded, DtmfIn, MarkIn

MARK_EVERY_SAMPLES = 1600  # a mark per 200 ms of bot audio: heard_ms resolution
ECHO_TAIL_S = 0.25  # the line keeps echoing the bot this long after its audio ends
# An utterance whose end mark has not come back this long after its audio should have finished playing
# is taken as heard (a peer that drops or never echoes marks must not leave the caller in dead air with
# the no-input timer never armed and the bot "speaking" forever).
MARK_SLACK_S = 2.0
FILLER_TEXT = "One moment."
APOLOGY_TEXT = "I'm sorry, I'm having trouble right now. Let me transfer you to someone who can help."
TRANSFER_FAILED_TEXT = "I'm sorry, I couldn't transfer you. Please call back later. Goodbye."
# Said to a call still live when the worker's shutdown grace runs out (rolling deploy, scale-in). Short: they are
# rendered ahead (CallManager) and played within ConversationConfig.shutdown_end_s. A policy may word them itself
# with the prompts `shutdown`, `shutdown_transfer` and `shutdown_transfer_failed`. (Calm voice: 4.4, 2.4, 3.5 s.)
SHUTDOWN_TEXT = "I'm sorry, I have to end this call now. Please call us back."
SHUTDOWN_TRANSFER_TEXT = "Sorry, I have to transfer you now."
SHUTDOWN_TRANSFER_FAILED_TEXT = "Sorry, I couldn't transfer you. Please call back."
SHUTDOWN_STYLE = "calm"
# a Twilio call back on a new stream after its previous one was lost (its worker died): instead of the greeting
RECONNECTED_TEXT = "Sorry, we were cut off for a moment. How can I help you?"
RECONNECTED_PENDING_TEXT = "Sorry, we were cut off."  # ... then the question the caller had not answered yet
# a SIP call taken over by a new leg (INVITE with Replaces: attended transfer back to the bot, call pickup)
RESUMED_TEXT = "Thanks for waiting. How can I help you?"
RESUMED_PENDING_TEXT = "Thanks for waiting."  # ... then the question the caller had not answered yet
# said when a call reaches BOT_MAX_CALL_S (a policy may word it: prompt `max_duration`); it used to end in silence
MAX_DURATION_TEXT = "I'm sorry, this call has reached its time limit. Please call us back. Goodbye."
SHUTDOWN_ACTIONS = ("transfer", "goodbye", "hangup")


# How a bridge's end reason reads as a call outcome (an RTP timeout means the caller vanished).
# A SIP session timer that ran out (no refresh from the phone, or ours refused) is the same: the far end is gone.
_END_REASON_OUTCOME = {"stream_stopped": "caller_hangup", "hangup": "caller_hangup", "rtp_timeout": "abandoned",
                       "session_expired": "abandoned"}
# Utterances the caller is meant to answer (the decision's action names them): if the voice fails on one, the
# call goes the policy's system-error way instead of waiting, silent, for an answer to a question never asked.
_DIALOG_KINDS = frozenset({"greeting", "answer", "confirm", "clarify", "reprompt", "collect", "dtmf_menu"})
# Why the bot hung up, as the call's outcome: only a goodbye is a call the bot completed (the automation
# rate on the dashboard counts those), not a silent line, a closed queue or a failure.
_HANGUP_OUTCOME = {"no_input": "no_input", "out_of_hours": "out_of_hours", "callback": "callback",
                   "engine_error": "system_error", "redis_error": "system_error"}


@dataclass
class ConversationConfig:
    no_input_s: float | None = None  # None: the policy's no_input.timeout_s
    filler_after_s: float = 1.0
    silence_budget_s: float = 1.6  # caller-side silence (end-of-turn wait + processing) before a filler
    engine_timeout_s: float = 5.0
    eot_timeout_s: float = 0.5  # a slower end-of-turn answer is ignored: the max-silence rule decides
    dtmf_inter_digit_s: float = 2.0
    fallback_queue: str = "support"
    transfer_wait_s: float = 5.0  # after a transfer, wait this long for the transport to end the call
    max_call_s: float = 1800.0
    # A call still live when the shutdown grace runs out: "transfer" hands it to the policy's system_error
    # queue with its context (reason `shutdown`) when that queue is open, else says goodbye; "goodbye" only
    # says the short goodbye; "hangup" ends it in silence (the old behaviour).
    shutdown_action: str = "transfer"
    # How long those calls may take to end after the grace (prompt, transfer in flight, REST/REFER): the
    # orchestrator's kill timeout must cover BOT_SHUTDOWN_GRACE_S + this + the state/webhook flush.
    shutdown_end_s: float = 8.0

    def __post_init__(self) -> None:
        if self.shutdown_action not in SHUTDOWN_ACTIONS:
            raise ValueError(f"shutdown_action must be one of {', '.join(SHUTDOWN_ACTIONS)}, "
                             f"not {self.shutdown_action!r}")
        if not self.shutdown_end_s >= 0:
            raise ValueError(f"shutdown_end_s must be >= 0, not {self.shutdown_end_s!r}")


@dataclass
class Services:
    """Process-wide pieces shared by every call on this worker."""

    engine: Any  # engine.interface.SpeechEngine (+ optional speak_stream)
    store: CallStore
    vad: BatchedVad
    new_policy: Callable[[Any], CallPolicy]  # CallInfo -> this call's policy session
    prompt_audio: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    config: ConversationConfig = field(default_factory=ConversationConfig)
    turn_params: TurnParams = field(default_factory=TurnParams)
    notify_escalation: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    engine_backend: str = "onnx"


@dataclass
class _Utterance:
    uid: int
    kind: str
    text: str
    sent: int = 0  # samples handed to the bridge
    heard: int = 0  # samples the caller has heard (from marks)
    done_sending: bool = False
    heard_all: asyncio.Event = field(default_factory=asyncio.Event)
    interrupted: bool = False
    first_audio_t: float | None = None


class Conversation:
    def __init__(self, bridge: CallBridge, services: Services) -> None:
        self.bridge = bridge
        self.s = services
        self.cfg = services.config
        self.info = bridge.info
        self.call_id = self.info.call_id
        self.transport = self.info.transport
        self.log = get_logger("bot.conversation", call_id=self.call_id)
        self.policy = services.new_policy(self.info)
        # the call's progress in its record after every decision: a new stream on another worker carries on
        self.policy.on_change = lambda snap: self.s.store.update(self.call_id,
                                                                 policy_state=json.dumps(snap, default=str))
        self.detector = TurnDetector(services.turn_params)
        self.audio = CallerAudio()
        self._q: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._utt_seq = 0
        self._utts: dict[int, _Utterance] = {}
        self._speaking: _Utterance | None = None  # utterance whose audio may still be playing
        self._play_task: asyncio.Task[None] | None = None
        self._turn_task: asyncio.Task[None] | None = None
        self._eot_task: asyncio.Task[None] | None = None
        self._no_input: asyncio.TimerHandle | None = None
        self._dtmf_timer: asyncio.TimerHandle | None = None
        self._echo_timer: asyncio.TimerHandle | None = None
        self._mark_watchdogs: dict[int, asyncio.TimerHandle] = {}
        self._playout_end = 0.0  # monotonic time the caller will have heard all bot audio sent so far
        self._digits = ""
        self._dtmf_acted_t = float("-inf")  # when a menu key was acted on at once (a '#' right after it is moot)
        self._turn_n = 0
        self._turn_start_sample: int | None = None
        self._turn_forced = False  # the last turn was cut at max_turn_s while the caller kept talking
        self._background: set[asyncio.Task[None]] = set()
        self.outcome: str | None = None
        self._ending = False
        self._transferring = False  # the transport has been asked to move the call (REST / REFER in flight)
        self._bridge_ended = asyncio.Event()  # the transport's CallEnded has arrived
        self._t0 = time.monotonic()
        self._first_started_at: float | None = None  # a resumed leg: when the call's first leg started (unix s)

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> str:
        s = self.s
        started_t = float(getattr(self.bridge, "started_t", self._t0))
        # library log lines (httpx, websockets) logged in this call's task and the tasks it starts carry its id
        structlog.contextvars.bind_contextvars(call_id=self.call_id)
        metrics.CALLS_STARTED.labels(self.transport).inc()
        metrics.ACTIVE_CALLS.labels(self.transport).inc()
        leg = int(getattr(self.info, "leg", 1) or 1)
        replaces = str(getattr(self.info, "resumes", "") or "")
        # Twilio's stream and account; SIP's signalling transport and media (rtp/srtp): was this call encrypted
        extra = {k: v for k, v in self.info.params.items()
                 if k in ("stream_sid", "account_sid", "signalling", "media")}
        if replaces:
            extra["replaces"] = replaces
        s.store.start_call(self.call_id, self.transport, self.info.caller, self.info.called,
                           str(self.policy.version), extra=extra, leg=leg)
        s.store.subscribe(self.call_id, lambda ok: self._q.put_nowait(("state", ok)))
        self._keep_resumable()
        set_sink = getattr(self.bridge, "set_error_sink", None)
        if set_sink is not None:
            set_sink(self._protocol_error)
        self.log.info("call_resumed" if leg > 1 else "call_started", transport=self.transport,
                      caller=mask_digits(self.info.caller), policy_version=self.policy.version,
                      **({"leg": leg} if leg > 1 else {}))
        vad_stream = s.vad.open(self._on_vad)
        reader = asyncio.get_running_loop().create_task(self._read(vad_stream))
        try:
            text, style = await self._opening(leg, replaces)
            self._say(text, style, "greeting", started_t=started_t)
            await asyncio.wait_for(self._main(), timeout=self.cfg.max_call_s)
        except asyncio.TimeoutError:
            self._set_outcome("max_duration")
            await self._say_last(self._policy_prompt("max_duration", MAX_DURATION_TEXT), "max_duration")
            await self._hang_up("max_duration")
        except Exception as exc:  # noqa: BLE001 - one call's bug must not reach the worker
            metrics.ERRORS.labels("conversation", "exception").inc()
            self.log.exception("conversation_failed", error=str(exc))
            self._set_outcome("error:exception")
            try:
                await self.bridge.hangup("error")
            except Exception as hangup_exc:  # noqa: BLE001 - the leg may be gone; say so, the carrier may not
                self.log.warning("hangup_failed", reason="error", error=str(hangup_exc))
        finally:
            u = self._speaking
            if u is not None and not u.heard_all.is_set() and not u.interrupted:
                # the call ended mid-prompt (the caller hung up on it): how much of it they heard
                self._record_heard(u, interrupted=True, by="call_ended")
            vad_stream.close()
            for t in (self._play_task, self._turn_task, self._eot_task):
                if t is not None and not t.done():
                    t.cancel()
            for h in (self._no_input, self._dtmf_timer, self._echo_timer, *self._mark_watchdogs.values()):
                if h is not None:
                    h.cancel()
            reader.cancel()
            outcome = self.outcome or "unknown"
            leg_s = round(time.monotonic() - self._t0, 3)
            # a resumed call's duration is the caller's, from its first leg; this leg's own is kept beside it
            whole = {"duration_s": round(max(leg_s, time.time() - self._first_started_at), 3),
                     "leg_duration_s": leg_s} if self._first_started_at is not None else {"duration_s": leg_s}
            try:
                audio = self.bridge.media_quality()
            except Exception as exc:  # noqa: BLE001 - a measurement must never cost the call its end record
                self.log.warning("media_quality_failed", error=repr(exc)[:200])
                audio = None
            s.store.end_call(self.call_id, outcome, turns=self._turn_n, **whole, **({"audio": audio} if audio else {}))
            metrics.ACTIVE_CALLS.labels(self.transport).dec()
            metrics.CALLS_TOTAL.labels(self.transport, outcome).inc()
            self.log.info("call_ended", outcome=outcome, turns=self._turn_n,
                          duration_s=round(time.monotonic() - self._t0, 3))
        return self.outcome or "unknown"

    def _keep_resumable(self) -> None:
        """A SIP call keeps its dialog in its record, kept current, so that a restarted worker can re-INVITE the
        phone and carry the call on if this process dies (bot/sip_recovery.py)."""
        resume_state = getattr(self.bridge, "resume_state", None)
        state = resume_state() if callable(resume_state) else None
        if state is None:
            return
        self.s.store.keep_resumable(self.call_id, state)
        self.bridge.on_dialog_change = lambda st: self.s.store.keep_resumable(self.call_id, st)  # type: ignore[attr-defined]

    async def _opening(self, leg: int, replaces: str) -> tuple[str, str]:
        """What the bot says first: the greeting; or, for a call that was already under way (a Twilio call back
        on a new stream, leg 2+; a SIP leg that replaced the bot's earlier leg), a word about it and the question
        the caller had not answered yet, with the conversation carried on from where it was."""
        if leg > 1:
            keys = ("reconnected", RECONNECTED_TEXT, "reconnected_pending", RECONNECTED_PENDING_TEXT)
        elif replaces:
            keys = ("resumed", RESUMED_TEXT, "resumed_pending", RESUMED_PENDING_TEXT)
        else:
            greeting = self.policy.greeting()
            return greeting.prompt, greeting.style
        if await self._restore_progress(self.call_id if leg > 1 else replaces):
            q = self.policy.pending_question()
            if q is not None:
                return f"{self._policy_prompt(keys[2], keys[3])} {q.prompt}", q.style
            return self._policy_prompt(keys[0], keys[1]), "neutral"
        greeting = self.policy.greeting()  # nothing to carry on from: a fresh conversation, said so
        return self._policy_prompt(keys[0], keys[1]), greeting.style

    async def _restore_progress(self, source: str) -> bool:
        """The policy state, request and transcript the earlier leg (`source`: this call id for a Twilio leg, the
        replaced call's for a SIP Replaces) kept in its record. Bounded (the caller is waiting for the bot to
        speak); anything unreadable or from a policy that no longer fits starts the conversation afresh."""
        try:
            raw, started = await asyncio.wait_for(
                self.s.store.r.hmget(call_key(source), "policy_state", "started_at"), 0.5)
            if source == self.call_id:
                self._first_started_at = finite_float(started)  # unreadable: the leg's own duration
            snap = json.loads(raw) if raw else None
        except Exception as exc:  # noqa: BLE001 - Redis slow or down, a garbled value: start afresh
            self.log.warning("progress_unreadable", error=repr(exc)[:200])
            snap = None
        ok = bool(snap) and self.policy.restore(snap)
        q = self.policy.pending_question() if ok else None
        self.s.store.event(self.call_id, "progress_restored", restored=ok, pending=q.action if q else None,
                           turns_before=self.policy.state.turn if ok else 0, **({"from_call": source}
                                                                                 if source != self.call_id else {}))
        self.log.info("progress_restored", restored=ok, pending=q.action if q else None)
        return ok

    def _set_outcome(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome

    async def _main(self) -> None:
        while True:
            kind, val = await self._q.get()
            if kind == "ended":
                reason: str = val
                if self._transferring and self._turn_task is not None and not self._turn_task.done():
                    # Twilio stops the stream as it moves the call, possibly before its REST answer reaches
                    # us: let the transfer finish (outcome, handoff, event, webhook) instead of cancelling it
                    try:
                        await asyncio.wait_for(asyncio.shield(self._turn_task), timeout=15.0)
                    except (asyncio.TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001
                        pass
                self._set_outcome(_END_REASON_OUTCOME.get(reason, reason))
                return
            if kind == "stop":
                return
            if self._ending:
                continue
            if kind == "turn_event":
                self._on_turn_event(val)
            elif kind == "dtmf_done":
                self._start_processing(self._decide_dtmf, val)
            elif kind == "no_input":
                if self.bridge.on_hold:  # the caller put us on hold: their silence is no failed turn
                    self._arm_no_input()
                    continue
                if self._turn_task is None or self._turn_task.done():
                    self.s.store.event(self.call_id, "no_input")
                    self._start_processing(self._decide_simple, self.policy.on_no_input)
            elif kind == "voice_failed":
                self.s.store.event(self.call_id, "voice_failed", kind=val)
                self._start_processing(self._decide_simple, lambda: self._failure("voice_error"))
            elif kind == "state" and not val:
                self.log.warning("state_degraded")
                self.s.store.event(self.call_id, "state_degraded")
                self._start_processing(self._decide_simple, lambda: self._failure("state_unavailable"))

    # ------------------------------------------------------------------ inbound
    async def _read(self, vad_stream: Any) -> None:
        try:
            async for ev in self.bridge.events():
                if isinstance(ev, AudioIn):
                    self.audio.append(ev.pcm)
                    vad_stream.push(ev.pcm, self.audio.pos / 8000.0)
                elif isinstance(ev, MarkIn):
                    self._on_mark(ev.name)
                elif isinstance(ev, DtmfIn):
                    self._on_dtmf(ev.digit)
                elif isinstance(ev, CallEnded):
                    self._bridge_ended.set()
                    self._q.put_nowait(("ended", ev.reason))
                    return
        except Exception as exc:  # noqa: BLE001
            metrics.ERRORS.labels("conversation", "reader").inc()
            self.log.exception("reader_failed", error=str(exc))
            self._q.put_nowait(("ended", "error:reader"))

    def _protocol_error(self, kind: str, detail: str) -> None:
        self.s.store.event(self.call_id, "error", component=self.transport, kind=kind, detail=detail[:200])

    def _on_vad(self, prob: float, level_db: float, t: float) -> None:
        ev = self.detector.update(prob, level_db, t)
        if ev is not None:
            self._q.put_nowait(("turn_event", ev))

    def _on_mark(self, name: str) -> None:
        try:
            uid_s, pos_s = name.split(":", 1)
            u = self._utts.get(int(uid_s))
            end = pos_s.startswith("end")
            pos = int(pos_s[4:] if end else pos_s)
        except ValueError:
            metrics.ERRORS.labels("conversation", "bad_mark").inc()
            return
        if u is None or u.interrupted or u.heard_all.is_set():
            return  # marks Twilio returns for audio a `clear` dropped were never heard; a repeated end mark
        u.heard = max(u.heard, min(pos, u.sent * 1000 // 8000))  # never more than was sent
        if end:
            u.heard_all.set()
            self._utterance_heard(u)

    def _on_dtmf(self, digit: str) -> None:
        self.s.store.event(self.call_id, "dtmf", digit=digit)
        just_acted = time.monotonic() - self._dtmf_acted_t < self.cfg.dtmf_inter_digit_s
        if digit == "#" and not self._digits and just_acted:
            return  # "0#": the menu key was acted on already; its '#' must not cut off the reply
        self._dtmf_acted_t = float("-inf")
        loop = asyncio.get_running_loop()
        if self._speaking is not None:
            self._spawn(self._interrupt("dtmf"))
        self._cancel_no_input()
        if self._dtmf_timer is not None:
            self._dtmf_timer.cancel()
        if digit == "#":
            digits, self._digits = self._digits, ""
            self._q.put_nowait(("dtmf_done", digits + "#"))
            return
        self._digits += digit
        if self.policy.dtmf_complete(self._digits):  # a menu key: no inter-digit wait (dead air)
            digits, self._digits = self._digits, ""
            self._dtmf_acted_t = time.monotonic()
            self._q.put_nowait(("dtmf_done", digits))
            return
        self._dtmf_timer = loop.call_later(self.cfg.dtmf_inter_digit_s, self._dtmf_timeout)

    def _dtmf_timeout(self) -> None:
        digits, self._digits = self._digits, ""
        if digits:
            self._q.put_nowait(("dtmf_done", digits))

    # ------------------------------------------------------------------ turn taking
    def _on_turn_event(self, ev: TurnEvent) -> None:
        if ev.kind in ("speech_started", "barge_in"):
            self._cancel_no_input()
            if (self._turn_task is not None and not self._turn_task.done() and self._speaking is None
                    and not self._turn_forced):
                # caller went on talking while we were still thinking: treat it as one longer turn (not after
                # a turn cut at max_turn_s: merging that one again and again, a monologue or a loud TV in the
                # room would never get an answer)
                self._turn_task.cancel()
                self.s.store.event(self.call_id, "turn_resumed")
            else:
                self._turn_start_sample = int(ev.speech_start_t * 8000)
            if self._turn_start_sample is None:
                self._turn_start_sample = int(ev.speech_start_t * 8000)
            if ev.kind == "barge_in":
                self._spawn(self._interrupt("speech", ev))
            elif self._play_task is not None and not self._play_task.done() and self._speaking is None:
                # a reply still rendering when the caller starts talking would talk over them
                self._play_task.cancel()
                self.s.store.event(self.call_id, "prompt_cancelled", why="caller_speaking")
        elif ev.kind == "check_eot":
            self._eot_task = asyncio.get_running_loop().create_task(self._check_eot(ev))
        elif ev.kind == "turn_end":
            self._end_turn(ev, eot_prob=self.detector.eot_prob)
        elif ev.kind == "speech_discarded":
            self.s.store.event(self.call_id, "speech_discarded", ms=round((ev.speech_end_t - ev.speech_start_t) * 1000))
            self._turn_start_sample = None
            if self._speaking is None:
                self._arm_no_input()

    async def _check_eot(self, ev: TurnEvent) -> None:
        start = self._turn_start_sample or 0
        pcm = self.audio.segment(max(0, start - 1600), self.audio.pos)
        try:
            p = float(await asyncio.wait_for(self.s.engine.end_of_turn(pcm), timeout=self.cfg.eot_timeout_s))
        except Exception as exc:  # noqa: BLE001 - fall back to the max-silence rule
            metrics.ERRORS.labels("engine", "end_of_turn").inc()
            self.log.warning("eot_failed", error=type(exc).__name__)
            return
        if self.detector.set_eot(p):
            silence_ms = (self.audio.pos / 8000.0 - self.detector.last_speech_t) * 1000
            done = TurnEvent("turn_end", time.monotonic(), self.detector.speech_start_t, self.detector.last_speech_t,
                             silence_ms)
            self.detector.reset()
            self._end_turn(done, eot_prob=p)

    def _end_turn(self, ev: TurnEvent, eot_prob: float | None) -> None:
        start = self._turn_start_sample if self._turn_start_sample is not None else int(ev.speech_start_t * 8000)
        end = int(ev.speech_end_t * 8000) + 800  # keep 100 ms after the last speech window
        pcm = self.audio.segment(max(0, start - 1600), end)  # 200 ms pre-roll
        self._turn_start_sample = None
        self._turn_forced = ev.forced
        metrics.END_OF_TURN_WAIT.observe(max(0.0, ev.silence_ms / 1000))
        meta = {"eot_wait_ms": round(ev.silence_ms), "eot_prob": None if eot_prob is None else round(eot_prob, 3),
                "speech_ms": round((ev.speech_end_t - ev.speech_start_t) * 1000), "t_end": time.monotonic()}
        self._start_processing(self._process_turn, pcm, meta)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A fire-and-forget task, referenced until done: the loop keeps only weak references, so an
        unreferenced task (an escalation webhook mid-request) can be garbage-collected before it finishes."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _start_processing(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        if self._turn_task is not None and not self._turn_task.done():
            self._turn_task.cancel()
        self._cancel_no_input()
        self._turn_task = asyncio.get_running_loop().create_task(self._guard(fn(*args)))

    async def _guard(self, coro: Awaitable[None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            metrics.ERRORS.labels("conversation", "turn").inc()
            self.log.exception("turn_failed", error=str(exc))
            await self._execute(self._failure("internal_error"), None, {})

    async def _process_turn(self, pcm: np.ndarray, meta: dict[str, Any]) -> None:
        self._turn_n += 1
        n = self._turn_n
        t_end = meta["t_end"]
        # the caller has already waited eot_wait in silence: the filler comes early enough that the
        # line is never silent for more than ~1.6 s of the 2 s budget
        waited = meta.get("eot_wait_ms", 0) / 1000
        filler = asyncio.get_running_loop().call_later(
            min(self.cfg.filler_after_s, max(0.2, self.cfg.silence_budget_s - waited)), self._filler)
        try:
            t0 = time.perf_counter()
            try:
                u: Understanding = await asyncio.wait_for(self.s.engine.understand(pcm), self.cfg.engine_timeout_s)
            except asyncio.TimeoutError:
                metrics.ERRORS.labels("engine", "timeout").inc()
                self.log.warning("engine_timeout", turn=n)
                d = self._failure("engine_timeout")
                self.s.store.event(self.call_id, "turn", n=n, error="engine_timeout", decision=d.to_dict(), **_ms(meta))
                await self._execute(d, t_end, meta)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                metrics.ERRORS.labels("engine", "understand").inc()
                self.log.warning("engine_failed", turn=n, error=type(exc).__name__)
                d = self._failure("engine_error")
                self.s.store.event(self.call_id, "turn", n=n, error="engine_error", decision=d.to_dict(), **_ms(meta))
                await self._execute(d, t_end, meta)
                return
            understand_ms = (time.perf_counter() - t0) * 1000
            if u.intent is not None or u.error is None:
                metrics.INTENT_CONFIDENCE.observe(u.confidence)
            t1 = time.perf_counter()
            d = self.policy.on_turn(u)
            decide_ms = (time.perf_counter() - t1) * 1000
            self.s.store.event(
                self.call_id, "turn", n=n, intent=u.intent, confidence=round(u.confidence, 4),
                alternatives=u.to_dict()["alternatives"], slots=u.slots, transcript=u.transcript,
                caller_state=u.caller_state, understanding_error=u.error, decision=d.to_dict(),
                understand_ms=round(understand_ms, 1), decide_ms=round(decide_ms, 2), **_ms(meta),
                **({"slot_candidates": u.slot_candidates} if u.slot_candidates else {}),
            )
            self.log.info("turn", n=n, intent=u.intent, confidence=round(u.confidence, 3), action=d.action,
                          reason=d.reason, understand_ms=round(understand_ms, 1))
        finally:
            filler.cancel()
        await self._execute(d, t_end, meta)

    async def _decide_simple(self, fn: Callable[[], Decision]) -> None:
        await self._execute(fn(), None, {})

    async def _decide_dtmf(self, digits: str) -> None:
        d = self.policy.on_dtmf(digits)
        self.s.store.event(self.call_id, "dtmf_turn", digits_len=len(digits), decision=d.to_dict())
        await self._execute(d, None, {})

    def _failure(self, reason: str) -> Decision:
        """The policy's answer to a failure on our side: its apology (counted: the dashboard's "fillers and
        apologies" panel) and a transfer or goodbye."""
        d = self.policy.on_failure(reason)
        if d.prompt:
            metrics.FILLERS.labels("apology").inc()
        return d

    def _filler(self) -> None:
        if self._speaking is None:
            metrics.FILLERS.labels("filler").inc()
            self._say(FILLER_TEXT, "neutral", "filler")

    # ------------------------------------------------------------------ acting on decisions
    async def _execute(self, d: Decision, t_end: float | None, meta: dict[str, Any]) -> None:
        metrics.POLICY_DECISIONS.labels(d.action, d.reason or "none").inc()
        wait_s = meta.get("eot_wait_ms", 0) / 1000  # the caller's silence before t_end: part of what they wait
        if d.action == "transfer":
            await self._transfer(d, t_end, wait_s)
            return
        if d.action == "hangup":
            self._ending = True
            u = self._say(d.prompt, d.style, "hangup", t_end=t_end, eot_wait_s=wait_s) if d.prompt else None
            if u is not None:
                await self._wait_heard(u)
            end_reason = self.policy.end_reason(d)
            if end_reason == "callback":
                self._record_callback(d)
            self._set_outcome(_HANGUP_OUTCOME.get(end_reason, "completed"))
            await self._hang_up("completed")
            self._q.put_nowait(("stop", None))
            return
        if d.prompt:
            self._say(d.prompt, d.style, d.action, t_end=t_end, eot_wait_s=wait_s)
        else:
            self._arm_no_input()

    async def _transfer(self, d: Decision, t_end: float | None, wait_s: float = 0.0) -> None:
        self._ending = True
        target = self.policy.transfer_target(d) or self.cfg.fallback_queue
        context = self.policy.handoff_context(d)
        context.update(call_id=self.call_id, transport=self.transport, target=target)
        metrics.ESCALATIONS.labels(d.reason or "unspecified").inc()
        if d.prompt:
            u = self._say(d.prompt, d.style, "transfer", t_end=t_end, eot_wait_s=wait_s)
            await self._wait_heard(u)
        if self._bridge_ended.is_set():
            return  # the caller hung up during the announcement: nobody to move
        ok = await self._hand_over(target, context, d.reason, timeout_s=10)
        if ok:
            self._set_outcome("transferred")
            # the transport ends the stream once the call has moved; don't hold it open forever
            try:
                await asyncio.wait_for(self._bridge_ended.wait(), self.cfg.transfer_wait_s)
            except asyncio.TimeoutError:
                pass
            await self._hang_up("transferred")
        elif self._bridge_ended.is_set():
            pass  # the caller is gone: no apology to play; the end reason is the outcome
        else:
            self._set_outcome("transfer_failed")
            u = self._say(TRANSFER_FAILED_TEXT, "calm", "transfer_failed")
            await self._wait_heard(u)
            await self._hang_up("transfer_failed")
        self._q.put_nowait(("stop", None))

    async def _hand_over(self, target: str, context: dict[str, Any], reason: str, timeout_s: float) -> bool:
        """Ask the transport to move the call (bounded) and record it: handoff, event, log, escalation webhook."""
        ok = False
        error: dict[str, str] = {}
        self._transferring = True
        try:
            ok = await asyncio.wait_for(self.bridge.transfer(target, context), timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001
            metrics.ERRORS.labels(self.transport, "transfer").inc()
            self.log.warning("transfer_error", error=type(exc).__name__)
            error = {"error": f"{type(exc).__name__}: {exc}"[:200] if str(exc) else type(exc).__name__}
        if not ok and not error:
            error = {"error": "refused by the transport (see its warning just before: unconfigured queue, REST or REFER failure)"}
        self.s.store.update(self.call_id, handoff=context, transfer_target=target)
        self.s.store.event(self.call_id, "transfer", target=target, ok=ok, reason=reason, context=context, **error)
        self.log.info("transfer", target=target, ok=ok, reason=reason, **error)
        if self.s.notify_escalation is not None:  # queued, delivered (signed, retried) off the call's path
            self._spawn(self.s.notify_escalation({**context, "transfer_ok": ok}))
        return ok

    # ------------------------------------------------------------------ worker shutdown
    def shutdown_prompts(self) -> list[tuple[str, str]]:
        """(text, style) of what this call may say if it is still live when the shutdown grace runs out."""
        action = self.cfg.shutdown_action
        if action == "hangup":
            return []
        keys = [(self._policy_prompt("shutdown", SHUTDOWN_TEXT), SHUTDOWN_STYLE)]
        if action == "transfer" and self.bridge.can_transfer:
            keys += [(self._policy_prompt("shutdown_transfer", SHUTDOWN_TRANSFER_TEXT), SHUTDOWN_STYLE),
                     (self._policy_prompt("shutdown_transfer_failed", SHUTDOWN_TRANSFER_FAILED_TEXT), SHUTDOWN_STYLE)]
        return keys

    def _policy_prompt(self, key: str, default: str) -> str:
        prompts = getattr(self.policy.policy, "prompts", None) or {}
        text = prompts.get(key) if isinstance(prompts, Mapping) else None
        return text if isinstance(text, str) and text.strip() else default

    @property
    def transferring(self) -> bool:
        return self._transferring

    def end_for_shutdown(self, audio: Mapping[tuple[str, str], np.ndarray], deadline: float) -> str:
        """The shutdown grace is over and this call is still live: end it by `deadline` (loop time). A call
        already ending by itself (a transfer announced or in flight, a goodbye) is left to finish, and keeps its
        own outcome (transferred / transfer_failed / completed). Any other is told (pre-rendered `audio` only:
        never waiting on the voice) and, by the configured action, handed to a human or said goodbye to, then
        ended with outcome `shutdown`. Returns what was done, for the drain's log."""
        if self._bridge_ended.is_set():
            return "already_ended"
        if self._ending:
            self.log.info("shutdown_left_to_finish", transferring=self._transferring)
            self.s.store.event(self.call_id, "shutdown", action="left_to_finish", transferring=self._transferring)
            return "transfer_in_flight" if self._transferring else "finishing"
        self._ending = True  # no new turn from here on: _main ignores caller input
        self._set_outcome("shutdown")
        self._cancel_no_input()
        if self._dtmf_timer is not None:
            self._dtmf_timer.cancel()
        if self._turn_task is not None and not self._turn_task.done():
            self._turn_task.cancel()  # a turn still being understood would only start a new prompt
        self._turn_task = asyncio.get_running_loop().create_task(self._shutdown(audio, deadline))
        return "ended_by_bot"

    async def _shutdown(self, audio: Mapping[tuple[str, str], np.ndarray], deadline: float) -> None:
        try:
            await self._stop_speaking("shutdown")
            d: Decision | None = None
            if self.cfg.shutdown_action == "transfer" and not self.bridge.can_transfer:
                # "I have to transfer you" then "I couldn't" on a line that cannot be moved: the goodbye instead
                self.log.info("shutdown_transfer_unavailable", transport=self.transport)
            elif self.cfg.shutdown_action == "transfer":
                try:
                    # the policy's system-error route: its queue if open (or the queue its hours send on to)
                    got = self.policy.on_failure("shutdown")
                    d = dataclasses.replace(got, reason="shutdown") if got.action == "transfer" else None
                except Exception as exc:  # noqa: BLE001 - a policy bug must not leave the caller in silence
                    metrics.ERRORS.labels("conversation", "shutdown_policy").inc()
                    self.log.warning("shutdown_policy_failed", error=repr(exc))
            if d is not None:
                action = "transfer"
            else:  # "goodbye", or "transfer" to a queue that is closed now
                action = "hangup" if self.cfg.shutdown_action == "hangup" else "goodbye"
            self.s.store.event(self.call_id, "shutdown", action=action)
            self.log.info("shutdown_ending_call", action=action)
            if d is not None:
                await self._shutdown_transfer(d, audio, deadline)
            else:
                if action == "goodbye":
                    await self._say_prerendered(self._policy_prompt("shutdown", SHUTDOWN_TEXT), audio, deadline)
                await self._hangup_quietly("shutdown")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever failed, the call still ends
            metrics.ERRORS.labels("conversation", "exception").inc()
            self.log.exception("shutdown_failed", error=str(exc))
            await self._hangup_quietly("shutdown")
        finally:
            self._q.put_nowait(("stop", None))

    async def _shutdown_transfer(self, d: Decision, audio: Mapping[tuple[str, str], np.ndarray],
                                 deadline: float) -> None:
        loop = asyncio.get_running_loop()
        target = self.policy.transfer_target(d) or self.cfg.fallback_queue
        context = self.policy.handoff_context(d)
        context.update(call_id=self.call_id, transport=self.transport, target=target)
        metrics.ESCALATIONS.labels("shutdown").inc()
        await self._say_prerendered(self._policy_prompt("shutdown_transfer", SHUTDOWN_TRANSFER_TEXT), audio, deadline)
        if self._bridge_ended.is_set():
            return  # the caller hung up on the announcement
        # leave a moment of the budget for the goodbye-less hang-up after a failed transfer
        ok = await self._hand_over(target, context, "shutdown", timeout_s=max(0.1, deadline - loop.time() - 0.5))
        if ok:
            try:  # the transport ends the leg once the call has moved (as after any transfer, bounded)
                await asyncio.wait_for(self._bridge_ended.wait(),
                                       max(0.0, min(self.cfg.transfer_wait_s, deadline - loop.time())))
            except asyncio.TimeoutError:
                pass
        elif not self._bridge_ended.is_set():
            await self._say_prerendered(self._policy_prompt("shutdown_transfer_failed", SHUTDOWN_TRANSFER_FAILED_TEXT),
                                        audio, deadline)
        await self._hangup_quietly("shutdown")

    async def _say_prerendered(self, text: str, audio: Mapping[tuple[str, str], np.ndarray], deadline: float) -> None:
        """Say a shutdown prompt from its pre-rendered audio, if there is some and time to play it all;
        else nothing (the call ends without it, as it did before there were any)."""
        if self._bridge_ended.is_set():
            return  # the caller is gone
        pcm = audio.get((text, SHUTDOWN_STYLE))
        left = deadline - asyncio.get_running_loop().time()
        if pcm is None or len(pcm) / 8000 + 0.5 > left:
            metrics.ERRORS.labels("conversation", "shutdown_prompt_skipped").inc()
            self.log.warning("shutdown_prompt_skipped", reason="not_rendered" if pcm is None else "no_time",
                             left_s=round(left, 2))
            return
        metrics.FILLERS.labels("apology").inc()
        u = self._say(text, SHUTDOWN_STYLE, "shutdown", pcm=pcm)
        try:
            await asyncio.wait_for(self._wait_heard(u), timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
        except asyncio.TimeoutError:
            pass

    async def _say_last(self, text: str, kind: str, timeout_s: float = 10.0) -> None:
        """The bot's last words before it hangs up (the call's own loop is over): cut what it was saying, say
        this, wait (bounded) until it was heard. Never raises: the hang-up follows whatever happened."""
        if self._bridge_ended.is_set():
            return
        try:
            await self._stop_speaking(kind)
            u = self._say(text, SHUTDOWN_STYLE, kind)
            await asyncio.wait_for(self._wait_heard(u), timeout_s)
        except Exception as exc:  # noqa: BLE001 - a voice or transport failure: hang up without it
            self.log.warning("last_words_failed", kind=kind, error=repr(exc))

    async def _stop_speaking(self, why: str) -> None:
        """Cut what the bot is saying now (a read-back mid-sentence): recorded as heard so far."""
        u = self._speaking
        if self._play_task is not None and not self._play_task.done():
            self._play_task.cancel()
        if u is None or u.heard_all.is_set() or u.interrupted:
            return
        u.interrupted = True
        self._speaking = None
        self._drop_watchdog(u)
        try:
            await self.bridge.clear()
        except Exception as exc:  # noqa: BLE001 - the leg may be gone
            self.log.warning("clear_failed", error=type(exc).__name__)
        self._playout_end = time.monotonic()
        self._record_heard(u, interrupted=True, by=why)

    async def _hang_up(self, reason: str) -> None:
        """The bot ends the call. Recorded (and flushed, briefly) before the line goes: the moment a Twilio stream
        closes, Twilio asks any worker what next (<Connect action>), and the answer must be "hang up", not "the
        stream was lost, reconnect" (bot/app.py reads `ending` from the record)."""
        self.s.store.mark_ending(self.call_id, reason)
        recorded = False
        try:
            recorded = await asyncio.wait_for(self.s.store.flush(0.5), 0.6)
        except Exception:  # noqa: BLE001 - Redis slow or down: hang up anyway; the record says so later
            pass
        if recorded:
            await self.bridge.hangup(reason)
        else:  # no worker can read that the bot ended it: a bridge whose end depends on that says so itself
            await self.bridge.hangup_unshared(reason)

    async def _hangup_quietly(self, reason: str) -> None:
        try:
            await self._hang_up(reason)
        except Exception as exc:  # noqa: BLE001 - the leg may be gone already
            self.log.warning("hangup_failed", reason=reason, error=str(exc))

    def abort(self, outcome: str) -> None:
        """The shutdown's time is up: stop whatever the call is doing now; run() records `outcome` unless the
        call already has one (a transfer that completed, a goodbye said). The caller's leg is hung up by the
        caller of this."""
        self._set_outcome(outcome)
        self._ending = True
        for t in (self._turn_task, self._play_task):
            if t is not None and not t.done():
                t.cancel()
        self._q.put_nowait(("stop", None))

    def _record_callback(self, d: Decision) -> None:
        """A callback accepted is a hand-off to people who will call back: they get what a transferred call's
        agent gets (request, values, transcript, tries, reason) and the number to call, in the call record."""
        context = self.policy.handoff_context(d)
        context.update(call_id=self.call_id, transport=self.transport, callback=True, caller=self.info.caller,
                       target=self.policy.transfer_target(d))
        self.s.store.update(self.call_id, handoff=context, callback_queue=d.target or "")
        self.s.store.event(self.call_id, "callback", queue=d.target, context=context)
        self.log.info("callback_requested", queue=d.target, intent=context.get("intent"))
        if self.s.notify_escalation is not None:  # the team that calls back learns of it now, not from Redis
            self._spawn(self.s.notify_escalation(context))

    async def _wait_heard(self, u: _Utterance) -> None:
        """Until the caller heard the utterance (bounded by its length + slack)."""
        while not u.done_sending:
            await asyncio.sleep(0.05)
        try:
            await asyncio.wait_for(u.heard_all.wait(), timeout=u.sent / 8000 + 2.0)
        except asyncio.TimeoutError:
            pass

    # ------------------------------------------------------------------ speaking
    def _say(self, text: str, style: str, kind: str, t_end: float | None = None,
             started_t: float | None = None, eot_wait_s: float = 0.0, pcm: np.ndarray | None = None) -> _Utterance:
        """Queue an utterance; `pcm`: its audio, already rendered (else the prompt cache or the voice)."""
        self._utt_seq += 1
        u = _Utterance(self._utt_seq, kind, text)
        self._utts[u.uid] = u
        prev = self._play_task
        self._play_task = asyncio.get_running_loop().create_task(self._play(u, style, prev, t_end, started_t,
                                                                                  eot_wait_s, pcm))
        return u

    async def _play(self, u: _Utterance, style: str, prev: asyncio.Task[None] | None,
                    t_end: float | None, started_t: float | None, eot_wait_s: float = 0.0,
                    pcm: np.ndarray | None = None) -> None:
        if prev is not None and not prev.done():
            try:
                await prev  # utterances play in order (filler, then the answer)
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._cancel_no_input()
        try:
            chunks = _once(pcm) if pcm is not None else render(self.s.engine, self.s.prompt_audio, u.text, style)
            async for chunk in chunks:
                if u.first_audio_t is None:
                    self._speaking = u
                    self.detector.bot_level_db = level_dbfs(chunk)
                    if self._echo_timer is not None:
                        self._echo_timer.cancel()
                    await self._send_audio(chunk[:MARK_EVERY_SAMPLES])
                    now = time.monotonic()
                    u.first_audio_t = now
                    if t_end is not None:
                        metrics.TURN_LATENCY.labels(self.transport).observe(now - t_end)
                        metrics.VOICE_TO_VOICE.labels(self.transport).observe(now - t_end + eot_wait_s)
                        self.s.store.event(self.call_id, "first_audio", utt=u.uid, kind=u.kind, turn=self._turn_n,
                                           latency_ms=round((now - t_end) * 1000, 1),
                                           voice_to_voice_ms=round((now - t_end + eot_wait_s) * 1000, 1))
                    if started_t is not None:
                        metrics.GREETING_LATENCY.labels(self.transport).observe(now - started_t)
                        latency_ms = round((now - started_t) * 1000, 1)
                        self.s.store.event(self.call_id, "greeting_started", latency_ms=latency_ms)
                        self.log.info("greeting", latency_ms=latency_ms)
                    await self._send_marked(u, chunk[MARK_EVERY_SAMPLES:], len(chunk[:MARK_EVERY_SAMPLES]))
                else:
                    await self._send_marked(u, chunk, 0)
            await self.bridge.mark(f"{u.uid}:end{u.sent * 1000 // 8000}")
            if not u.heard_all.is_set():
                self._mark_watchdogs[u.uid] = asyncio.get_running_loop().call_at(
                    max(self._playout_end, time.monotonic()) + MARK_SLACK_S, self._marks_missing, u, u.heard)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a voice failure: never dead air
            metrics.ERRORS.labels("engine", "speak").inc()
            self.log.warning("speak_failed", error=type(exc).__name__, kind=u.kind)
            if self._speaking is u:
                self._speaking = None  # no end mark will come: nothing of it is playing
            if u.kind in _DIALOG_KINDS:
                # The caller never heard the question they are meant to answer, and no end mark arms the
                # no-input timer: left alone the line stays silent until max_call_s. The policy's
                # system-error path apologises and transfers (or says goodbye when the queue is closed).
                self._q.put_nowait(("voice_failed", u.kind))
            elif u.kind == "transfer" and (APOLOGY_TEXT, "calm") in self.s.prompt_audio:
                metrics.FILLERS.labels("apology").inc()  # the cached apology announces the transfer instead
                await self.bridge.send_audio(self.s.prompt_audio[(APOLOGY_TEXT, "calm")])
        finally:
            u.done_sending = True

    async def _send_audio(self, pcm: np.ndarray) -> None:
        """Hand audio to the bridge, keeping the estimate of when the caller will have heard it all."""
        await self.bridge.send_audio(pcm)
        self._playout_end = max(self._playout_end, time.monotonic()) + len(pcm) / 8000

    def _marks_missing(self, u: _Utterance, heard_when_armed: int) -> None:
        """The utterance should have played out but its end mark never came back: treat it as heard. Unless
        it is still playing (marks came back since: it was held up, e.g. the caller put us on hold) or the
        call is on hold now: then wait for the rest."""
        self._mark_watchdogs.pop(u.uid, None)
        if u.heard_all.is_set() or u.interrupted:
            return
        if self.bridge.on_hold or u.heard > heard_when_armed:
            rest_s = max(0, u.sent * 1000 // 8000 - u.heard) / 1000
            self._mark_watchdogs[u.uid] = asyncio.get_running_loop().call_later(
                rest_s + MARK_SLACK_S, self._marks_missing, u, u.heard)
            return
        metrics.ERRORS.labels(self.transport, "marks_missing").inc()
        self.log.warning("marks_missing", utt=u.uid, kind=u.kind, heard_ms=u.heard)
        u.heard_all.set()
        self._utterance_heard(u, marks_missing=True)

    async def _send_marked(self, u: _Utterance, pcm: np.ndarray, already_sent: int) -> None:
        """Hand audio to the bridge in 200 ms pieces, each followed by a mark (what was heard)."""
        if already_sent:
            u.sent += already_sent
            await self.bridge.mark(f"{u.uid}:{u.sent * 1000 // 8000}")
        for i in range(0, len(pcm), MARK_EVERY_SAMPLES):
            piece = pcm[i : i + MARK_EVERY_SAMPLES]
            await self._send_audio(piece)
            u.sent += len(piece)
            await self.bridge.mark(f"{u.uid}:{u.sent * 1000 // 8000}")

    def _record_heard(self, u: _Utterance, **extra: Any) -> None:
        """The call's `prompt_heard` event: what the bot said and how much of it the caller heard."""
        self.s.store.event(self.call_id, "prompt_heard", utt=u.uid, kind=u.kind, text=u.text,
                           duration_ms=u.sent * 1000 // 8000, heard_ms=u.heard, **extra)

    def _drop_watchdog(self, u: _Utterance) -> None:
        h = self._mark_watchdogs.pop(u.uid, None)
        if h is not None:
            h.cancel()

    def _utterance_heard(self, u: _Utterance, marks_missing: bool = False) -> None:
        self._drop_watchdog(u)
        self._record_heard(u, interrupted=False, **({"marks_missing": True} if marks_missing else {}))
        if self._speaking is u:
            self._speaking = None
            self._echo_timer = asyncio.get_running_loop().call_later(ECHO_TAIL_S, self._echo_done)
            if not self._ending and (self._turn_task is None or self._turn_task.done()):
                self._arm_no_input()

    def _echo_done(self) -> None:
        if self._speaking is None:
            self.detector.bot_level_db = None

    async def _interrupt(self, why: str, ev: TurnEvent | None = None) -> None:
        u = self._speaking
        if u is None or self._ending:
            return
        t_detect = time.monotonic()
        u.interrupted = True
        self._speaking = None
        self.detector.bot_level_db = None
        if self._play_task is not None and not self._play_task.done():
            self._play_task.cancel()
        self._drop_watchdog(u)
        await self.bridge.clear()
        self._playout_end = time.monotonic()  # the bridge dropped what was queued
        metrics.BARGE_INS.labels(self.transport).inc()
        onset_ms = None
        if ev is not None:
            onset_ms = round((ev.t - ev.speech_start_t) * 1000)
        self._record_heard(u, interrupted=True, by=why, detect_after_onset_ms=onset_ms,
                           clear_ms=round((time.monotonic() - t_detect) * 1000, 1))
        self.log.info("barge_in", utt=u.uid, heard_ms=u.heard, by=why)

    # ------------------------------------------------------------------ timers
    def _arm_no_input(self) -> None:
        self._cancel_no_input()
        secs = self.cfg.no_input_s if self.cfg.no_input_s is not None else self.policy.no_input_s
        if secs > 0 and not self._ending:
            self._no_input = asyncio.get_running_loop().call_later(secs, lambda: self._q.put_nowait(("no_input", None)))

    def _cancel_no_input(self) -> None:
        if self._no_input is not None:
            self._no_input.cancel()
            self._no_input = None


async def _once(pcm: np.ndarray) -> AsyncIterator[np.ndarray]:
    yield pcm


def _ms(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != "t_end"}
