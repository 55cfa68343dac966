"""Softphone signalling: a browser's WebRTC offer becomes a telephony.webrtc bridge that runs the
same conversation as Twilio and SIP calls, under the policy the admin picked (draft or version).
Keypad keys travel on the call's own data channel (see telephony/webrtc.py), not through this API.
A call that never connects gets a call record of its own (no conversation) and is counted.

An admin who hangs up (or closes the tab) before media flows has nothing to tell the bot over the media
path: Chrome sends no BYE or DTLS close for a peer connection that never connected, so the bot used to wait
out its 20 s connect timeout and record error:connect_timeout. The console withdraws its offer instead: the
same endpoint with type "rollback" (WebRTC's word for withdrawing an offer) and the offer's SDP. Its ICE
credentials name the call and prove the sender made the offer; the call ends as caller_hangup. The rollback
may reach another worker than the one holding the call (or arrive before the offer does), so it is also left
in Redis for a minute, where the holding worker looks while it waits for the call to connect.

A browser whose call's worker died (its peer connection fails: nothing answers its media any more) sends a new
offer naming the call (`resume`). If that call is the same admin's softphone call, lost with its worker (or
abandoned for lack of media: the browser's network went away) within RESUME_WINDOW_S, the new peer connection
carries it on as leg N+1 on whichever worker takes the offer: same call id and record, the conversation
restored from it ("Sorry, we were cut off ..."), as a Twilio call on a new stream. While the old worker still
holds it (fresh heartbeat) the answer is 409 `call_live` and the browser tries again a moment later."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from typing import Any

from fastapi import FastAPI

from bot.admin.auth import Principal
from bot.reaper import close_lost_leg, redis_time
from bot.state import LIVE, STREAM_LOST_OUTCOMES, call_key, decode_hash, finite_float
from ops import metrics
from ops.logs import get_logger
from telephony.webrtc import SignallingError, WebRTCCallBridge, ice_servers, wait_first

log = get_logger("bot.admin.softphone")

ROLLBACK_KEY = "softphone:rollback:{}"  # + offer_key(): a withdrawn offer, for the worker holding its call
ROLLBACK_TTL_S = 60  # past any connect timeout: the call is connected or over by then
ROLLBACK_POLL_S = 0.5  # how often a call waiting to connect looks for its rollback in Redis
RESUME_WINDOW_S = 60.0  # a lost softphone call can be carried on this long after it was lost
RESUME_STALE_S = 15.0  # a call whose heartbeat is older than this is taken as lost with its worker
MAX_LEGS = 3  # as a Twilio call's streams: a call that keeps losing its worker is not carried on forever
RESUME_KEY = "softphone:resume:{}:{}"  # call id, leg: one new peer connection per lost leg, however many offers
# a lost leg the browser may carry on: its worker died, or it ended the call for lack of media (network gone)
RESUMABLE_OUTCOMES = STREAM_LOST_OUTCOMES | {"abandoned"}
_UFRAG = re.compile(r"^a=ice-ufrag:(\S+)", re.M)
_PWD = re.compile(r"^a=ice-pwd:(\S+)", re.M)


def offer_key(sdp: str) -> str | None:
    """The offer's identity: a hash of its first ICE ufrag and password (the password is a secret only the
    browser and the bot hold, so a rollback that names it comes from the offerer). None without them."""
    ufrag, pwd = _UFRAG.search(sdp), _PWD.search(sdp)
    if ufrag is None or pwd is None:
        return None
    return hashlib.sha256(f"{ufrag.group(1)}:{pwd.group(1)}".encode()).hexdigest()[:32]


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


def _redis(app: FastAPI) -> Any:
    r = getattr(app.state, "redis", None)
    return r if r is not None else getattr(getattr(app.state, "call_store", None), "r", None)


async def start_call(app: FastAPI, sdp: str, sdp_type: str, policy: Any, label: str, who: Principal,
                     resume: str | None = None) -> dict[str, Any]:
    if sdp_type == "rollback":  # may reach a worker other than the call's (or one running no calls)
        return await rollback(app, sdp, who)
    run = _call_runner(app)
    servers = browser_config()["iceServers"]
    leg = await _resume_leg(app, resume, who) if resume else 1
    bridge = WebRTCCallBridge(caller=f"softphone:{who.name}", params={"policy": label, "admin": who.name},
                              servers=servers, call_id=resume or "", leg=leg)
    key = offer_key(sdp) if sdp_type == "offer" else None
    pending: dict[str, WebRTCCallBridge] = _pending(app)
    if key is not None:
        pending[key] = bridge  # before accept(): a rollback sent while the offer is in flight finds it
    try:
        answer = await bridge.accept(sdp, sdp_type)
    except SignallingError as exc:
        if key is not None and pending.get(key) is bridge:
            del pending[key]
        raise SoftphoneError(400, "bad_offer", str(exc)) from exc

    t0 = time.monotonic()

    async def _run() -> None:
        try:
            # The conversation starts once media flows, so the greeting is neither lost nor timed
            # from before ICE/DTLS finished. A peer that never connects is ended by the bridge (its
            # watchdog); one that fails, hangs up or withdraws its offer first ends the wait at once.
            await _wait_connected(app, bridge, key)
            if not bridge.connected.is_set():
                if bridge.info.leg > 1 and bridge.end_reason != "hangup":
                    await _resume_not_connected(app, bridge, who, t0)
                else:
                    _record_not_connected(app, bridge, label, who, t0)
                return
            await run(bridge, policy_override=(label, policy))
        except Exception as exc:  # noqa: BLE001 - one broken call never takes the worker down
            metrics.ERRORS.labels("softphone", "call_failed").inc()
            log.error("softphone_call_failed", call_id=bridge.info.call_id, error=repr(exc))
        finally:
            if key is not None and pending.get(key) is bridge:
                del pending[key]
            await bridge.close()

    tasks: set[asyncio.Task[None]] = getattr(app.state, "softphone_tasks", None) or set()
    app.state.softphone_tasks = tasks
    t = asyncio.get_running_loop().create_task(_run())
    tasks.add(t)
    t.add_done_callback(tasks.discard)
    log.info("softphone_call", call_id=bridge.info.call_id, admin=who.name, policy=label,
             **({"leg": leg} if leg > 1 else {}))
    return {"sdp": answer.sdp, "type": answer.type, "call_id": bridge.info.call_id, "leg": leg}


async def _resume_leg(app: FastAPI, call_id: str, who: Principal) -> int:
    """The leg a new offer carries `call_id` on as, or a SoftphoneError saying why it cannot: not found (404),
    not this admin's softphone call (403), still live on its worker (409 call_live: try again shortly), or over
    (409 call_over: ended by the bot or the caller, lost too long ago, or lost too many times)."""
    r = _redis(app)
    store = getattr(getattr(getattr(app.state, "calls", None), "s", None), "store", None)
    if r is None:
        raise SoftphoneError(503, "state_unavailable", "carrying a call on needs its record in Redis")
    key = call_key(call_id)
    try:
        rec = decode_hash(await asyncio.wait_for(r.hgetall(key), 2.0))
        if not rec:
            raise SoftphoneError(404, "unknown_call", f"no call {call_id!r} to carry on")
        if rec.get("transport") != "webrtc" or rec.get("caller") != f"softphone:{who.name}":
            raise SoftphoneError(403, "forbidden", "that call is not one of your softphone calls")
        now = await redis_time(r)
        if rec.get("status") == "active":
            last = await r.zscore(LIVE, call_id)
            if last is not None and now - float(last) < RESUME_STALE_S:
                raise SoftphoneError(409, "call_live", "the call is still live on its worker: try again shortly")
            # its worker died and nobody has closed it yet (one process per host: the heartbeat reaper waits 30 s)
            worker = getattr(store, "worker", "softphone")
            await asyncio.wait_for(close_lost_leg(r, call_id, f"{worker}-softphone-resume",
                                                  getattr(store, "ttl_s", None)), 4.0)
            rec = decode_hash(await r.hgetall(key))
        leg = int(finite_float(rec.get("leg")) or 1)
        lost_at = finite_float(rec.get("ended_at"))
        if (rec.get("status") != "ended" or rec.get("outcome") not in RESUMABLE_OUTCOMES or rec.get("ending")
                or lost_at is None or now - lost_at > RESUME_WINDOW_S or leg >= MAX_LEGS):
            raise SoftphoneError(409, "call_over", "that call is over and cannot be carried on")
        if not await r.set(RESUME_KEY.format(call_id, leg + 1), who.name, nx=True, ex=int(RESUME_WINDOW_S)):
            raise SoftphoneError(409, "call_live", "that call is being carried on by another offer")
    except SoftphoneError:
        raise
    except Exception as exc:  # noqa: BLE001 - Redis down or slow: say so; the browser may try again
        raise SoftphoneError(503, "state_unavailable", f"could not read the call's record: {exc!r}"[:200]) from exc
    log.info("softphone_call_resuming", call_id=call_id, leg=leg + 1, outcome=rec.get("outcome"), admin=who.name)
    return leg + 1


def _pending(app: FastAPI) -> dict[str, WebRTCCallBridge]:
    """This worker's softphone calls that have not connected yet, by offer_key()."""
    pending: dict[str, WebRTCCallBridge] | None = getattr(app.state, "softphone_pending", None)
    if pending is None:
        pending = app.state.softphone_pending = {}
    return pending


async def _wait_connected(app: FastAPI, bridge: WebRTCCallBridge, key: str | None) -> None:
    """Until the call connects or ends (the bridge's connect watchdog bounds it), looking in Redis for a
    rollback of its offer that another worker took."""
    deadline = time.monotonic() + bridge.connect_timeout_s + 1
    r = _redis(app) if key is not None else None
    warned = False
    while time.monotonic() < deadline:
        if await wait_first((bridge.connected, bridge.finished), ROLLBACK_POLL_S if r is not None else
                            deadline - time.monotonic()):
            return
        if r is None:
            continue
        try:
            by = await r.get(ROLLBACK_KEY.format(key))
            if by is not None:
                by = by.decode() if isinstance(by, bytes) else str(by)
                if by == bridge.info.params.get("admin"):
                    _withdraw(bridge)
                    return
                metrics.ERRORS.labels("softphone", "bad_rollback").inc()  # the ICE password matched: not expected
                log.warning("softphone_rollback_refused", call_id=bridge.info.call_id, admin=by)
                r = None
        except Exception as exc:  # noqa: BLE001 - Redis down: the local rollback and the watchdog still work
            if not warned:
                warned = True
                log.warning("softphone_rollback_check_failed", call_id=bridge.info.call_id, error=repr(exc))


def _withdraw(bridge: WebRTCCallBridge) -> None:
    """The caller withdrew the offer before media flowed: a caller hang-up (no conversation ran)."""
    log.info("softphone_offer_withdrawn", call_id=bridge.info.call_id, connected=bridge.connected.is_set())
    bridge.end("hangup")


async def rollback(app: FastAPI, sdp: str, who: Principal) -> dict[str, Any]:
    """The console withdraws its offer (hung up, tab closed): its call ends as a caller hang-up, here or on
    the worker that holds it. A call that has connected meanwhile is ended by the browser's own hang-up."""
    key = offer_key(sdp)
    if key is None:
        metrics.ERRORS.labels("softphone", "bad_rollback").inc()
        log.warning("softphone_bad_rollback", admin=who.name)
        raise SoftphoneError(400, "bad_offer", "a rollback carries the SDP of the offer it withdraws "
                             "(with its a=ice-ufrag and a=ice-pwd)")
    bridge = _pending(app).get(key)
    if bridge is not None:
        if bridge.info.params.get("admin") != who.name:  # the ICE password matched: not expected, but refuse
            metrics.ERRORS.labels("softphone", "bad_rollback").inc()
            log.warning("softphone_rollback_refused", call_id=bridge.info.call_id, admin=who.name)
            raise SoftphoneError(403, "forbidden", "that call was placed by another admin")
        if not bridge.connected.is_set():
            _withdraw(bridge)
        return {"type": "rollback", "call_id": bridge.info.call_id, "status": "ended"}
    r = _redis(app)
    if r is None:
        return {"type": "rollback", "call_id": None, "status": "unknown"}
    try:
        await r.set(ROLLBACK_KEY.format(key), who.name, ex=ROLLBACK_TTL_S)
    except Exception as exc:  # noqa: BLE001 - the call then ends at its connect timeout, as before
        metrics.ERRORS.labels("softphone", "rollback_failed").inc()
        log.warning("softphone_rollback_failed", admin=who.name, error=repr(exc))
        raise SoftphoneError(503, "state_unavailable", "could not reach Redis to end the call") from exc
    log.info("softphone_rollback_relayed", admin=who.name)
    return {"type": "rollback", "call_id": None, "status": "requested"}


async def _resume_not_connected(app: FastAPI, bridge: WebRTCCallBridge, who: Principal, t0: float) -> None:
    """A new peer connection meant to carry a lost call on never connected (the browser's network still failing,
    or this worker unreachable from it). Recording it as the call's end would end a call the console is still
    trying to carry on (its next offer got 409 call_over). The call stays as it was lost instead (outcome, leg,
    and the time it was lost, so RESUME_WINDOW_S still counts from then), an event tells the attempt, and the leg
    is free again for the console's next offer, here or on another worker. Not counted in voicebot_calls_total:
    the lost leg was, and the call's real end will be."""
    info = bridge.info
    reason = bridge.end_reason or "error:connect_timeout"
    waited = round(time.monotonic() - t0, 3)
    store = getattr(getattr(getattr(app.state, "calls", None), "s", None), "store", None)
    if store is not None:
        store.late_event(info.call_id, "resume_failed", leg=info.leg, reason=reason, waited_s=waited,
                         worker=getattr(store, "worker", ""))
    r = _redis(app)
    if r is not None:
        try:
            await asyncio.wait_for(r.delete(RESUME_KEY.format(info.call_id, info.leg)), 2.0)
        except Exception as exc:  # noqa: BLE001 - Redis down: the claim expires after RESUME_WINDOW_S anyway
            log.warning("softphone_resume_release_failed", call_id=info.call_id, leg=info.leg, error=repr(exc))
    metrics.ERRORS.labels("softphone", "resume_not_connected").inc()
    log.warning("softphone_resume_not_connected", call_id=info.call_id, leg=info.leg, reason=reason,
                waited_s=waited, admin=who.name)


def _record_not_connected(app: FastAPI, bridge: WebRTCCallBridge, label: str, who: Principal, t0: float) -> None:
    """A softphone call whose media never flowed (ICE failed, no answer from the browser within the connect
    timeout): like SIP's error:no_ack, a call record with that outcome and a voicebot_calls_total entry, so
    the admin's console and the dashboards see it; no conversation ran. The caller hanging up first (the
    offer withdrawn, or a DTLS close before "connected") is a caller_hangup, as on any other call."""
    reason = bridge.end_reason or "error:connect_timeout"
    outcome = (reason if reason.startswith("error:") else "caller_hangup" if reason == "hangup"
               else "error:not_connected")
    info = bridge.info
    waited = round(time.monotonic() - t0, 3)
    state = getattr(getattr(app.state, "calls", None), "s", None)
    store = getattr(state, "store", None)
    if store is not None:
        store.start_call(info.call_id, info.transport, info.caller, info.called, label,
                         extra={"admin": who.name}, leg=info.leg)  # a new leg of a lost call: its story goes on
        store.event(info.call_id, "connect_failed", reason=reason, waited_s=waited)
        store.end_call(info.call_id, outcome, duration_s=waited, turns=0)
    metrics.CALLS_TOTAL.labels(info.transport, outcome).inc()
    log.warning("softphone_call_not_connected", call_id=info.call_id, outcome=outcome, waited_s=waited,
                admin=who.name)
