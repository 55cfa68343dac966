"""The live calls of one worker: runs a Conversation per bridge, refuses new calls while draining,
and ends what is left when the shutdown grace runs out."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from bot.conversation import Conversation, Services
from bot.conversation_policy import CallPolicy
from ops import metrics
from ops.logs import get_logger
from telephony.bridge import CallBridge

log = get_logger("bot.calls")


class CallManager:
    def __init__(self, services: Services) -> None:
        self.s = services
        self.active: dict[str, Conversation] = {}
        self.draining = False
        # called once when draining starts: listeners that can refuse a call before answering it (SIP's 503,
        # which lets a trunk or Kamailio try another worker) do so instead of answering and hanging up
        self.on_drain: list[Callable[[], None]] = []
        self._idle = asyncio.Event()
        self._idle.set()

    async def run_call(self, bridge: CallBridge, policy_override: Any = None) -> str:
        """Run one call to its end (the bridges' on_call callback). Returns the outcome."""
        if self.draining:
            log.info("call_refused_draining", call_id=bridge.info.call_id)
            metrics.CALLS_TOTAL.labels(bridge.info.transport, "refused_draining").inc()
            await bridge.hangup("shutting_down")
            return "refused_draining"
        cid = bridge.info.call_id
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
        try:
            return await conv.run()
        finally:
            self.active.pop(cid, None)
            if not self.active:
                self._idle.set()

    async def drain(self, grace_s: float) -> None:
        """Stop taking calls, let live ones finish for up to grace_s, then end the rest."""
        if not self.draining:
            for hook in self.on_drain:
                try:
                    hook()
                except Exception:  # noqa: BLE001 - the drain itself must go on
                    log.exception("drain_hook_failed")
        self.draining = True
        n = len(self.active)
        log.info("draining", live_calls=n, grace_s=grace_s)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
            return
        except asyncio.TimeoutError:
            pass
        left = list(self.active.values())
        log.warning("grace_expired", ending=len(left))
        for conv in left:
            conv._set_outcome("shutdown")
            try:
                await conv.bridge.hangup("shutdown")
            except Exception as exc:  # noqa: BLE001 - keep ending the others
                conv.log.warning("hangup_failed", reason="shutdown", error=str(exc))
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=5)
        except asyncio.TimeoutError:
            log.error("calls_stuck_after_shutdown", n=len(self.active))
