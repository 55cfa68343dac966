"""The live calls of one worker: runs a Conversation per bridge, refuses new calls while draining,
and ends what is left when the shutdown grace runs out: a transfer in flight is left to finish, every other
call is told (a short pre-rendered prompt) and handed to a human or said goodbye to, all within
ConversationConfig.shutdown_end_s; whatever is still up then is hung up."""

from __future__ import annotations

import asyncio
import time
import inspect
from typing import Any, Callable

import numpy as np

from bot.conversation import Conversation, ConversationConfig, Services
from bot.conversation_policy import CallPolicy
from ops import metrics
from ops.logs import get_logger
from telephony.bridge import CallBridge

log = get_logger("bot.calls")
RESUME_WAIT_S = 5.0  # a reconnected stream waits this long for its lost leg's conversation to end on this worker
MIN_LATE_CALL_S = 3.0  # an answered call whose stream comes this close to the grace's end is not started


class CallManager:
    def __init__(self, services: Services) -> None:
        self.s = services
        self.active: dict[str, Conversation] = {}
        self.draining = False
        self.drain_started: float | None = None  # time.monotonic() of the first drain(): bounds what follows it
        # called once when draining starts: listeners that can refuse a call before answering it (SIP's 503,
        # which lets a trunk or Kamailio try another worker) do so instead of answering and hanging up
        self.on_drain: list[Callable[[], None]] = []
        self._idle = asyncio.Event()
        self._idle.set()
        # the shutdown prompts, rendered ahead at low priority: at the grace's end the voice may be busy and
        # there is no time to wait for it (kept apart from the prompt cache, which a policy publish prunes)
        self._shutdown_audio: dict[tuple[str, str], np.ndarray] = {}
        self._shutdown_wanted: set[tuple[str, str]] = set()
        self._shutdown_unrenderable: set[tuple[str, str]] = set()  # the voice refused: not retried per call
        self._shutdown_render: asyncio.Task[None] | None = None
        self._grace_end = 0.0  # time.monotonic() when the drain's grace runs out

    def _grace_left(self) -> float:
        return self._grace_end - time.monotonic() if self.draining else 0.0

    async def run_call(self, bridge: CallBridge, policy_override: Any = None) -> str:
        """Run one call to its end (the bridges' on_call callback). Returns the outcome."""
        if self.draining and bridge.answered_before_drain and self._grace_left() > MIN_LATE_CALL_S:
            # its stream came after the drain's wait for streams (bot.serve): the drain takes it along (the
            # grace's end treats it as any live call) instead of hanging up on an answered caller in silence
            log.info("call_admitted_draining", call_id=bridge.info.call_id, grace_left_s=round(self._grace_left(), 1))
        elif self.draining:
            log.info("call_refused_draining", call_id=bridge.info.call_id)
            metrics.CALLS_TOTAL.labels(bridge.info.transport, "refused_draining").inc()
            await bridge.hangup("shutting_down")
            return "refused_draining"
        cid = bridge.info.call_id
        if cid in self.active and getattr(bridge.info, "leg", 1) > 1:
            # the call back on a new stream while its lost one is still ending here (the socket broke, the
            # conversation is closing): the new leg waits for it rather than being refused as a duplicate
            deadline = time.monotonic() + RESUME_WAIT_S
            while cid in self.active and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        if cid in self.active:
            # a second stream/dialog with the id of a live call (a replayed `start`, a confused proxy): running
            # it would share the first one's record, heartbeat and bookkeeping, and the first to end would
            # drop the other's live-index entry (then reaped as `worker_lost` while still talking)
            log.warning("call_refused_duplicate_id", call_id=cid, transport=bridge.info.transport)
            metrics.ERRORS.labels(bridge.info.transport, "duplicate_call_id").inc()
            metrics.CALLS_TOTAL.labels(bridge.info.transport, "refused_duplicate").inc()
            try:
                await bridge.hangup("duplicate_call_id")
            except Exception as exc:  # noqa: BLE001 - the refused leg may be gone already
                log.warning("hangup_failed", call_id=cid, reason="duplicate_call_id", error=str(exc))
            return "refused_duplicate"
        services = self.s
        if policy_override is not None:
            # (label, Policy) from the admin softphone names the draft/version in the call record
            label, pol = policy_override if isinstance(policy_override, tuple) else ("override", policy_override)
            fixed: Callable[[Any], CallPolicy] = lambda info: CallPolicy(pol, label, info)  # noqa: E731
            services = Services(**{**services.__dict__, "new_policy": fixed})
        conv = Conversation(bridge, services)
        self.active[cid] = conv
        self._idle.clear()
        self._prepare_shutdown_prompts([conv])
        try:
            return await conv.run()
        finally:
            self.active.pop(cid, None)
            if not self.active:
                self._idle.set()

    def _prepare_shutdown_prompts(self, convs: list[Conversation]) -> None:
        """Render (once, in the background) what these calls would say if the grace ran out on them."""
        for conv in convs:
            try:
                self._shutdown_wanted.update(set(conv.shutdown_prompts()) - self._shutdown_unrenderable)
            except Exception as exc:  # noqa: BLE001 - without them the call is ended silently, as before
                conv.log.warning("shutdown_prompts_unknown", error=repr(exc))
        if self._shutdown_wanted - set(self._shutdown_audio) and (
                self._shutdown_render is None or self._shutdown_render.done()):
            self._shutdown_render = asyncio.get_running_loop().create_task(self._render_shutdown_prompts(),
                                                                           name="shutdown-prompts")

    async def _render_shutdown_prompts(self) -> None:
        from engine.types import SpeechStyle

        engine = self.s.engine
        prerender = getattr(engine, "prerender", None)
        try:
            background = prerender is not None and "background" in inspect.signature(prerender).parameters
        except (TypeError, ValueError):
            background = False
        while todo := sorted(self._shutdown_wanted - set(self._shutdown_audio)):
            for text, style in todo:
                st = SpeechStyle.named(style)
                try:
                    if background:  # on the idle renderer: callers' speech goes first; then speak() hits the cache
                        await prerender([text], st, background=True)
                    self._shutdown_audio[(text, style)] = np.asarray(await engine.speak(text, st), dtype=np.int16)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - that call then ends without the prompt
                    metrics.ERRORS.labels("engine", "prerender").inc()
                    log.warning("prerender_failed", text=text[:40], error=repr(exc), use="shutdown")
                    self._shutdown_wanted.discard((text, style))
                    self._shutdown_unrenderable.add((text, style))

    async def drain(self, grace_s: float) -> None:
        """Stop taking calls, let live ones finish for up to grace_s, then end the rest (bounded by the
        config's shutdown_end_s, then hung up)."""
        if not self.draining:
            self.drain_started = time.monotonic()
            self._grace_end = self.drain_started + grace_s
            for hook in self.on_drain:
                try:
                    hook()
                except Exception:  # noqa: BLE001 - the drain itself must go on
                    log.exception("drain_hook_failed")
        self.draining = True
        n = len(self.active)
        log.info("draining", live_calls=n, grace_s=grace_s)
        if self.active:  # a policy published since a call started may word them differently
            self._prepare_shutdown_prompts(list(self.active.values()))
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
            return
        except asyncio.TimeoutError:
            pass
        finally:
            self._grace_end = 0.0  # from here no late call is started: the worker is ending the others or exiting
            if self._idle.is_set() and self._shutdown_render is not None:
                self._shutdown_render.cancel()
        left = list(self.active.values())
        cfg: ConversationConfig = getattr(self.s, "config", None) or ConversationConfig()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.shutdown_end_s
        done: dict[str, int] = {}
        failed: list[Conversation] = []
        for conv in left:
            try:
                what = conv.end_for_shutdown(self._shutdown_audio, deadline)
            except Exception as exc:  # noqa: BLE001 - keep ending the others; this one is hung up now
                metrics.ERRORS.labels("conversation", "exception").inc()
                conv.log.exception("shutdown_failed", error=str(exc))
                failed.append(conv)
                what = "failed"
            done[what] = done.get(what, 0) + 1
        log.warning("grace_expired", ending=len(left), end_s=cfg.shutdown_end_s, **done)
        if failed:
            await asyncio.gather(*(self._hang_up(conv) for conv in failed))
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=cfg.shutdown_end_s)
        except asyncio.TimeoutError:
            pass
        if self._shutdown_render is not None:
            self._shutdown_render.cancel()
        if not self.active:
            return
        still = list(self.active.values())
        log.warning("shutdown_hangup", ending=len(still), after_s=cfg.shutdown_end_s)
        await asyncio.gather(*(self._hang_up(conv) for conv in still))
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=5)
        except asyncio.TimeoutError:
            log.error("calls_stuck_after_shutdown", n=len(self.active))

    @staticmethod
    async def _hang_up(conv: Conversation) -> None:
        """Time is up: the call's own run() ends now (and records its outcome), and its leg is hung up."""
        conv.abort("shutdown")
        try:
            await asyncio.wait_for(conv.bridge.hangup("shutdown"), timeout=2.0)
        except Exception as exc:  # noqa: BLE001 - keep ending the others
            conv.log.warning("hangup_failed", reason="shutdown", error=repr(exc))
