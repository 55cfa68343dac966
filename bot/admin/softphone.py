"""Softphone signalling: a browser's WebRTC offer becomes a telephony.webrtc bridge that runs the
same conversation as Twilio and SIP calls, under the policy the admin picked (draft or version).
Keypad keys travel on the call's own data channel (see telephony/webrtc.py), not through this API.
A call that never connects gets a call record of its own (no conversation) and is counted."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import FastAPI

from bot.admin.auth import Principal
from ops import metrics
from ops.logs import get_logger
from telephony.webrtc import SignallingError, WebRTCCallBridge, ice_servers, wait_first

log = get_logger("bot.admin.softphone")


class SoftphoneError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def _call_runner(app: FastAPI) -> Any:
    calls = getattr(app.state, "calls", None)
    run = getattr(calls, "run_call", None)
    if run is None:
        raise SoftphoneError(503, "softphone_unavailable", "this process runs no conversations (start it with `bot serve`)")
    return run


def browser_config() -> dict[str, Any]:
    """What the console's RTCPeerConnection needs: the same STUN/TURN servers the bot uses."""
    try:
        return {"iceServers": ice_servers()}
    except ValueError as exc:  # a bad BOT_WEBRTC_ICE_SERVERS disables the softphone, not the bot
        metrics.ERRORS.labels("softphone", "misconfigured").inc()
        log.error("softphone_misconfigured", error=str(exc))
        raise SoftphoneError(503, "softphone_misconfigured", str(exc)) from exc


async def start_call(app: FastAPI, sdp: str, sdp_type: str, policy: Any, label: str, who: Principal) -> dict[str, Any]:
    run = _call_runner(app)
    servers = browser_config()["iceServers"]
    bridge = WebRTCCallBridge(caller=f"softphone:{who.name}", params={"policy": label, "admin": who.name},
                              servers=servers)
    try:
        answer = await bridge.accept(sdp, sdp_type)
    except SignallingError as exc:
        raise SoftphoneError(400, "bad_offer", str(exc)) from exc

    t0 = time.monotonic()

    async def _run() -> None:
        try:
            # The conversation starts once media flows, so the greeting is neither lost nor timed
            # from before ICE/DTLS finished. A peer that never connects is ended by the bridge (its
            # watchdog); one that fails or hangs up first ends the wait at once.
            await wait_first((bridge.connected, bridge.finished), bridge.connect_timeout_s + 1)
            if not bridge.connected.is_set():
                _record_not_connected(app, bridge, label, who, t0)
                return
            await run(bridge, policy_override=(label, policy))
        except Exception as exc:  # noqa: BLE001 - one broken call never takes the worker down
            metrics.ERRORS.labels("softphone", "call_failed").inc()
            log.error("softphone_call_failed", call_id=bridge.info.call_id, error=repr(exc))
        finally:
            await bridge.close()

    tasks: set[asyncio.Task[None]] = getattr(app.state, "softphone_tasks", None) or set()
    app.state.softphone_tasks = tasks
    t = asyncio.get_running_loop().create_task(_run())
    tasks.add(t)
    t.add_done_callback(tasks.discard)
    log.info("softphone_call", call_id=bridge.info.call_id, admin=who.name, policy=label)
    return {"sdp": answer.sdp, "type": answer.type, "call_id": bridge.info.call_id}


def _record_not_connected(app: FastAPI, bridge: WebRTCCallBridge, label: str, who: Principal, t0: float) -> None:
    """A softphone call whose media never flowed (ICE failed, no answer from the browser within the connect
    timeout): like SIP's error:no_ack, a call record with that outcome and a voicebot_calls_total entry, so
    the admin's console and the dashboards see it; no conversation ran."""
    reason = bridge.end_reason or "error:connect_timeout"
    outcome = reason if reason.startswith("error:") else "error:not_connected"
    info = bridge.info
    waited = round(time.monotonic() - t0, 3)
    state = getattr(getattr(app.state, "calls", None), "s", None)
    store = getattr(state, "store", None)
    if store is not None:
        store.start_call(info.call_id, info.transport, info.caller, info.called, label,
                         extra={"admin": who.name})
        store.event(info.call_id, "connect_failed", reason=reason, waited_s=waited)
        store.end_call(info.call_id, outcome, duration_s=waited, turns=0)
    metrics.CALLS_TOTAL.labels(info.transport, outcome).inc()
    log.warning("softphone_call_not_connected", call_id=info.call_id, outcome=outcome, waited_s=waited,
                admin=who.name)
