"""FastAPI routes for Twilio: the voice webhook (TwiML) and the Media Streams WebSocket.

Each accepted stream becomes a TwilioCallBridge handed to `on_call` (run as its own task), so a
broken peer only ever ends its own call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request, Response, WebSocket
from starlette.websockets import WebSocketDisconnect

from ops import metrics
from ops.logs import get_logger, mask_digits
from telephony.twilio import protocol, twiml
from telephony.twilio.bridge import TwilioCallBridge
from telephony.twilio.rest import TwilioRest
from telephony.twilio.signature import SETTINGS_HEADER, STREAM_TOKEN_PARAM, SignatureChecker

OnCall = Callable[[TwilioCallBridge], Awaitable[None]]
log = get_logger("telephony.twilio")

STREAM_PATH = "/twilio/stream"
TRANSFER_STATUS_PATH = "/twilio/transfer-status"  # a transfer's <Dial>/<Enqueue> action: how it ended
# the stream's <Connect action>: Twilio asks what next once the stream has ended (the bot hung up, or the stream
# was lost: a worker died, a draining worker turned it away, the socket broke)
STREAM_ENDED_PATH = "/twilio/stream-ended"
LEG_PARAM = "VoicebotLeg"  # <Parameter> on a reconnected stream: which stream of the call it is (2, 3)
# a call's streams: the first and two reconnections. A call whose streams keep failing is not put through the
# same failure again: the policy's system-error queue (or its apology when closed), in Twilio's own voice
MAX_STREAM_LEGS = 3
# Twilio hangs up once its call is over; its action request then changes nothing
_CALL_OVER = {"completed", "canceled", "busy", "failed", "no-answer"}
# <Dial> DialCallStatus / <Enqueue> QueueResult values after which the caller talked to (or left for) a person
_CONNECTED = {"completed", "answered", "bridged", "bridging-in-process", "hangup", "redirected", "leave"}
# media messages tolerated before `start` (a real Twilio never sends any) before we hang up
MAX_EARLY_MEDIA = 50
MAX_RECORDED_UNKNOWN = 20  # unknown-event / wrong-stream messages recorded per call and kind (all are counted)
# A real Twilio sends `start` right after `connected`. A socket that never does would otherwise hold a
# coroutine and a file descriptor for as long as its peer keeps answering pings, i.e. forever.
START_TIMEOUT_S = 10.0
MAX_WEBHOOK_BYTES = 64 * 1024
# Twilio opens the stream a moment (well under a second, a few on a bad day) after it fetched the TwiML: a stream
# whose token is at most this old belongs to a call that was answered, and a draining worker still takes it
HANDSHAKE_WINDOW_S = 30.0
MAX_PENDING_HANDSHAKES = 10_000  # bounds the bookkeeping if streams never come (callers hanging up while ringing)
# a draining worker's answer to a new call's webhook: Twilio then requests the number's Fallback URL (the load
# balancer: a healthy worker answers) instead of playing busy to a caller that other workers could take
DRAINING_RETRY_AFTER_S = 1


class StreamHandshakes:
    """Which calls this worker answered with TwiML whose stream has not started yet, and whether the worker is
    draining. Draining turns away new calls (webhook 503) but never the stream of a call already answered,
    whichever worker of the deployment answered it (the token is keyed from configuration all workers share)."""

    def __init__(self) -> None:
        self.draining_since: float | None = None  # time.monotonic() of begin_drain()
        self._pending: OrderedDict[str, float] = OrderedDict()  # call_sid -> time.monotonic() TwiML was served
        # sockets accepted whose `start` has not been handled yet: possibly another worker's answered call (the
        # workers share one accept queue), so the drain waits for them too before refusing calls
        self.opening = 0

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def begin_drain(self) -> None:
        if self.draining_since is None:
            self.draining_since = time.monotonic()

    def answered(self, call_sid: str) -> None:
        self._pending[call_sid] = time.monotonic()
        self._pending.move_to_end(call_sid)
        self.pending()  # drops the expired ones
        while len(self._pending) > MAX_PENDING_HANDSHAKES:
            self._pending.popitem(last=False)

    def started(self, call_sid: str) -> bool:
        """The stream of `call_sid` started; True when this worker served its TwiML recently."""
        t = self._pending.pop(call_sid, None)
        return t is not None and time.monotonic() - t <= HANDSHAKE_WINDOW_S

    def pending(self) -> int:
        """Answered calls whose stream may still come (older ones: the caller hung up before it did)."""
        cutoff = time.monotonic() - HANDSHAKE_WINDOW_S
        while self._pending and next(iter(self._pending.values())) < cutoff:
            self._pending.popitem(last=False)
        return len(self._pending)


_HANDSHAKES: "weakref.WeakSet[StreamHandshakes]" = weakref.WeakSet()  # every router of this process


def begin_drain() -> None:
    """This process is draining (bot.serve, on SIGTERM): new Twilio calls get 503, answered ones still stream."""
    for h in list(_HANDSHAKES):
        h.begin_drain()


async def wait_pending_streams(timeout_s: float) -> int:
    """Wait (bounded) until every call this process answered has opened its stream, so the listener is not
    closed under a caller who already got TwiML. Returns how many never came."""
    deadline = time.monotonic() + max(timeout_s, 0.0)
    while True:
        left = sum(h.pending() + h.opening for h in list(_HANDSHAKES))
        if not left or time.monotonic() >= deadline:
            return left
        await asyncio.sleep(0.05)


@dataclass
class TwilioRouteConfig:
    checker: SignatureChecker
    rest: TwilioRest | None
    public_url: str = ""
    lead_ms: int = 120
    max_bad_messages: int = 0  # bad messages tolerated per call; the next one ends it
    is_draining: Callable[[], bool] = lambda: False
    start_timeout_s: float = START_TIMEOUT_S  # no `start` this long after accept: the socket is closed
    dial_caller_id: str = ""  # <Dial callerId> for transfers to a number / SIP URI ("": Twilio's default)
    dial_timeout_s: int = 0  # <Dial timeout>: ringing before "no-answer" (0: Twilio's 30 s)
    # (call_sid, status, reached_agent) when Twilio reports how a transfer ended: for the call record
    on_transfer_outcome: Callable[[str, str, bool], None] | None = None
    # whether a call whose stream ended is over ("hangup": the bot ended it, or the caller) or lost with the
    # caller still on the line ("reconnect"). None: no call state to ask, and no <Connect action>: the call ends
    # with its stream, as before
    stream_end: Callable[[str], Awaitable[str]] | None = None
    # TwiML for a call whose streams failed MAX_STREAM_LEGS times (the policy's system-error route): (call_sid,
    # the dial options a transfer from there uses)
    stream_lost_twiml: Callable[[str, twiml.DialOptions], str] | None = None


def _err(kind: str) -> None:
    metrics.ERRORS.labels("twilio", kind).inc()


def _host(headers: Mapping[str, str], fallback: str) -> str:
    """The host Twilio requested: a reverse proxy's X-Forwarded-Host (first hop) or Host."""
    fwd = headers.get("x-forwarded-host", "").split(",")[0].strip()
    return fwd or headers.get("host", "") or fallback


async def _signed_form(request: Request, cfg: TwilioRouteConfig, what: str) \
        -> tuple[list[tuple[str, str]] | None, Response | None]:
    """The POST parameters of a Twilio webhook whose signature checks out, else the response to send."""
    # read before the signature can be checked, so bounded: an unauthenticated sender must not make us buffer
    # an arbitrarily large body (Twilio's are a few KB, form-encoded)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_WEBHOOK_BYTES:
                _err("bad_request")
                log.warning(f"{what}_bad_request", error="body_too_large", limit=MAX_WEBHOOK_BYTES)
                return None, Response("request body too large", status_code=413)
        items = parse_qsl(body.decode("utf-8"), keep_blank_values=True)  # blank values are signed too
    except Exception as exc:  # noqa: BLE001 - a garbled body is the sender's fault, never a 500
        _err("bad_request")
        log.warning(f"{what}_bad_request", error=type(exc).__name__)
        return None, Response("bad request", status_code=400)
    call_id = next((v for k, v in items if k == "CallSid"), "")
    url = cfg.checker.public_url(request.url.scheme, _host(request.headers, request.url.netloc),
                                 request.url.path, request.url.query)
    reason = cfg.checker.check(url, items, request.headers.get("x-twilio-signature"),
                               request.headers.get(SETTINGS_HEADER))
    if reason:
        _err("bad_signature")
        # the URL we checked tells an admin behind a proxy what BOT_PUBLIC_URL should be
        log.warning(f"{what}_forbidden", call_id=call_id, reason=f"bad_signature:{reason}", checked_url=url)
        return None, Response("forbidden", status_code=403)
    return items, None


def make_router(on_call: OnCall, cfg: TwilioRouteConfig) -> APIRouter:
    router = APIRouter()
    handshakes = StreamHandshakes()
    _HANDSHAKES.add(handshakes)
    router.twilio_handshakes = handshakes  # type: ignore[attr-defined] - keeps it alive as long as the routes

    def draining() -> bool:
        return handshakes.draining or cfg.is_draining()

    if not cfg.checker.enabled:
        # anyone who can reach the port can place calls and use engine capacity
        log.warning("twilio_signatures_disabled", reason="no TWILIO_AUTH_TOKEN: webhook and stream are not authenticated")

    @router.post("/twilio/voice")
    async def voice(request: Request) -> Response:
        items, refused = await _signed_form(request, cfg, "webhook")
        if items is None:
            assert refused is not None
            return refused
        form = dict(items)
        call_id = form.get("CallSid", "")
        if draining():
            # not <Reject reason="busy">: that tells the caller "busy" although other workers are up. On a 5xx
            # Twilio requests the number's Fallback URL (point it at the load balancer, which has taken this
            # worker out of rotation: /readyz is 503), so the call lands on a healthy worker.
            metrics.CALLS_TOTAL.labels("twilio", "refused_draining").inc()
            log.info("webhook_refused_draining", call_id=call_id, status=503, retry_after_s=DRAINING_RETRY_AFTER_S)
            return Response("draining: this worker takes no new calls\n", status_code=503, media_type="text/plain",
                            headers={"Retry-After": str(DRAINING_RETRY_AFTER_S)})
        log.info("webhook", call_id=call_id, caller=mask_digits(form.get("From", "")))
        return _stream_twiml(request, form, call_id, 1)

    def _stream_twiml(request: Request, form: dict[str, str], call_id: str, leg: int) -> Response:
        """<Connect><Stream> for the call's leg `leg`: the caller's details and a fresh per-call token as stream
        parameters (they come back in the stream's `start`), the leg number from the second on, and the
        <Connect action> that asks what next when this stream ends."""
        host = _host(request.headers, request.url.netloc)
        params = {k: form.get(k, "") for k in ("From", "To", "CallSid", "Direction")}
        params[STREAM_TOKEN_PARAM] = cfg.checker.stream_token(call_id)
        if leg > 1:
            params[LEG_PARAM] = str(leg)
        if call_id:
            handshakes.answered(call_id)  # a drain starting now still waits for (and takes) this call's stream
        action = ("" if cfg.stream_end is None else
                  cfg.checker.public_url(request.url.scheme, host, STREAM_ENDED_PATH, f"leg={leg}"))
        return Response(twiml.connect_stream(cfg.checker.stream_url(host, STREAM_PATH, ""), params, action),
                        media_type="application/xml")

    @router.post(STREAM_ENDED_PATH)
    async def stream_ended(request: Request) -> Response:
        """Twilio's <Connect action>: the call's stream has ended. After the bot's own end (goodbye, a transfer,
        the caller hanging up) the call is hung up; a stream lost with the caller still on the line (its worker
        died, a draining worker refused it, the socket broke) gets a new one, on whichever worker takes it, up
        to MAX_STREAM_LEGS: a caller is never dropped in silence because one process went away. Answered while
        draining too: it is the call of a caller already on the line."""
        items, refused = await _signed_form(request, cfg, "stream_ended")
        if items is None:
            assert refused is not None
            return refused
        form = dict(items)
        call_id = form.get("CallSid", "")
        leg = _leg(request.url.query)
        call_status = (form.get("CallStatus") or "").strip().lower()
        if call_status in _CALL_OVER or not call_id:
            what = "call_over"
        else:
            try:
                what = await cfg.stream_end(call_id) if cfg.stream_end is not None else "hangup"
            except Exception as exc:  # noqa: BLE001 - without call state the caller still gets an answer
                log.warning("stream_end_unknown", call_id=call_id, error=repr(exc)[:200])
                what = "reconnect"
        if what == "reconnect" and leg >= MAX_STREAM_LEGS:
            what = "gave_up"
        metrics.TWILIO_STREAM_ENDS.labels(what).inc()
        if what == "reconnect":
            _err("stream_lost")
            log.warning("stream_reconnecting", call_id=call_id, leg=leg + 1)
            return _stream_twiml(request, form, call_id, leg + 1)
        if what == "gave_up":
            _err("stream_gave_up")
            log.error("stream_lost_gave_up", call_id=call_id, legs=leg)
            body = twiml.apologize_and_hang_up(twiml.STREAM_LOST_TEXT)
            if cfg.stream_lost_twiml is not None:
                host = _host(request.headers, request.url.netloc)
                dial = twiml.DialOptions(action_url=cfg.checker.public_url(request.url.scheme, host,
                                                                           TRANSFER_STATUS_PATH, ""),
                                         caller_id=cfg.dial_caller_id, timeout_s=cfg.dial_timeout_s)
                try:
                    body = cfg.stream_lost_twiml(call_id, dial)
                except Exception:  # noqa: BLE001 - the apology in Twilio's voice, never an error page
                    log.exception("stream_lost_route_failed", call_id=call_id)
            return Response(body, media_type="application/xml")
        log.info("stream_ended", call_id=call_id, leg=leg, result=what)
        return Response(twiml.hangup(), media_type="application/xml")

    @router.post(TRANSFER_STATUS_PATH)
    async def transfer_status(request: Request) -> Response:
        """Twilio's report that a transfer's <Dial>/<Enqueue> ended: after an agent, hang up; with none
        (no answer, busy, queue full, failed), apologize first instead of leaving the caller in dead air."""
        items, refused = await _signed_form(request, cfg, "transfer_status")
        if items is None:
            assert refused is not None
            return refused
        form = dict(items)
        status = (form.get("DialCallStatus") or form.get("QueueResult") or "").strip().lower()
        reached = status in _CONNECTED
        if not reached:
            _err("transfer_unanswered")
        (log.info if reached else log.warning)("transfer_outcome", call_id=form.get("CallSid", ""),
                                               status=status or "unknown", reached_agent=reached)
        if cfg.on_transfer_outcome is not None:
            try:
                cfg.on_transfer_outcome(form.get("CallSid", ""), status, reached)
            except Exception:  # noqa: BLE001 - recording it must not cost the caller the apology
                log.exception("transfer_outcome_hook_failed", call_id=form.get("CallSid", ""))
        return Response(twiml.transfer_outcome(apologize=not reached), media_type="application/xml")

    @router.websocket(STREAM_PATH)
    async def stream(ws: WebSocket) -> None:
        sig = ws.headers.get("x-twilio-signature")
        host = _host(ws.headers, "")
        url = cfg.checker.stream_url(host, ws.url.path, ws.url.query)
        reason = cfg.checker.check(url, {}, sig, ws.headers.get(SETTINGS_HEADER))
        if reason:
            _err("bad_signature")
            log.warning("stream_forbidden", reason=f"bad_signature:{reason}", checked_url=url)
            await ws.close(code=1008)  # before accept: the upgrade is answered with HTTP 403
            return
        # while draining the socket is still accepted: only `start` says (by its token) whether this is a call
        # already answered, which must go on, or a new one, which is refused there (1013)
        await ws.accept()
        dial = twiml.DialOptions(action_url=cfg.checker.public_url("https", host, TRANSFER_STATUS_PATH, ""),
                                 caller_id=cfg.dial_caller_id, timeout_s=cfg.dial_timeout_s)
        await _run_stream(ws, on_call, cfg, dial, handshakes, draining)

    return router


def _leg(query: str) -> int:
    """Which stream of its call ended (the action URL's leg=N). Anything else counts as the last one: a URL
    nobody signed cannot get here, so a garbled one is ours, and it must not start a reconnection loop."""
    raw = dict(parse_qsl(query)).get("leg", "")
    return int(raw) if raw.isdigit() and 1 <= int(raw) <= MAX_STREAM_LEGS else MAX_STREAM_LEGS


def _answered_call(cfg: TwilioRouteConfig, token: str | None, served_here: bool) -> bool:
    """A draining worker's test of a stream: its call was answered (TwiML served) moments ago, by this worker
    or another one of the deployment (the token is valid on any of them), so the caller is already on the line."""
    if served_here:
        return True
    if not cfg.checker.enabled:
        return False  # no tokens to tell an answered call from a new one: only the calls this worker answered
    age = cfg.checker.stream_token_age(token)
    return age is not None and age <= HANDSHAKE_WINDOW_S


async def _run_stream(ws: WebSocket, on_call: OnCall, cfg: TwilioRouteConfig, dial: twiml.DialOptions,
                      handshakes: StreamHandshakes | None = None,
                      draining: Callable[[], bool] | None = None) -> None:
    handshakes = handshakes or StreamHandshakes()
    draining = draining or cfg.is_draining
    bridge: TwilioCallBridge | None = None
    call_task: asyncio.Task[None] | None = None
    early_media = 0
    ignored: Counter[str] = Counter()  # harmless bad messages per kind (unknown_event, wrong_stream)
    bad = 0

    def report_ignored(b: TwilioCallBridge, kind: str, detail: str, **log_kw: str) -> None:
        """Recorded and logged a few times per call and kind, counted always: a flood must grow neither the
        event stream nor the log."""
        ignored[kind] += 1
        if ignored[kind] <= MAX_RECORDED_UNKNOWN:
            log.warning("bad_message", call_id=b.info.call_id, kind=kind, detail=detail[:80], **log_kw)
            b.report_error(kind, detail)
        elif ignored[kind] == MAX_RECORDED_UNKNOWN + 1:
            log.warning("bad_messages_suppressed", call_id=b.info.call_id, kind=kind, after=MAX_RECORDED_UNKNOWN)
    reason = "disconnected"
    opened = time.monotonic()
    handshakes.opening += 1
    opening = True

    async def close(code: int) -> None:
        await ws.close(code=code)

    try:
        while True:
            if bridge is None:
                left = cfg.start_timeout_s - (time.monotonic() - opened)
                try:
                    msg = await asyncio.wait_for(ws.receive(), timeout=max(left, 0.0))
                except asyncio.TimeoutError:
                    _err("start_timeout")
                    log.warning("stream_without_start", after_s=cfg.start_timeout_s, early_media=early_media)
                    reason = "error:start_timeout"
                    break
            else:
                msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                reason = "disconnected"
                break
            raw = msg.get("text")
            if raw is None:
                raw = msg.get("bytes") or b""
            now = time.monotonic()
            try:
                m = protocol.parse(raw)
            except protocol.ProtocolError as exc:
                _err(exc.kind)
                if exc.kind == "unknown_event" and bridge is not None:
                    report_ignored(bridge, exc.kind, exc.detail)  # Twilio adds event types: ignoring one is safe
                    continue
                cid = bridge.info.call_id if bridge else ""
                log.warning("bad_message", call_id=cid, kind=exc.kind, detail=exc.detail)
                if bridge is None:
                    if exc.fatal or bad >= cfg.max_bad_messages:
                        reason = f"error:{exc.kind}"
                        break
                    bad += 1
                    continue
                bridge.report_error(exc.kind, exc.detail)
                bad += 1
                if exc.fatal or bad > cfg.max_bad_messages:
                    reason = f"error:{exc.kind}"
                    break
                continue
            if bridge is not None and m.event in ("media", "mark", "dtmf", "stop") and m.stream_sid \
                    and m.stream_sid != bridge.stream_sid:
                # another stream's message on this socket: it must neither feed nor end this call (the caller
                # is not at fault), so it is dropped, counted, and recorded a few times
                _err("wrong_stream")
                report_ignored(bridge, "wrong_stream", f"{m.event} for stream {m.stream_sid[:40]}", twilio_event=m.event)
                continue
            if m.event == "media":
                if bridge is None:
                    early_media += 1
                    _err("media_before_start")
                    log.warning("media_before_start", call_id=m.stream_sid, count=early_media)
                    if early_media > MAX_EARLY_MEDIA:
                        reason = "error:media_before_start"
                        break
                    continue
                bridge.feed_media(m.payload, now)
            elif m.event == "mark":
                if bridge is not None:
                    bridge.feed_mark(m.name, now)
            elif m.event == "dtmf":
                if bridge is not None:
                    bridge.feed_dtmf(m.digit, now)
            elif m.event == "start":
                if bridge is not None:
                    _err("duplicate_start")
                    report_ignored(bridge, "duplicate_start", "")  # a flood must not grow the event stream
                    continue
                assert m.start is not None
                custom = dict(m.start.custom)
                token = custom.pop(STREAM_TOKEN_PARAM, None)
                served_here = handshakes.started(m.start.call_sid)
                why = cfg.checker.check_stream_token(m.start.call_sid, token)
                if why:  # not a call our webhook admitted (a replayed handshake, a stranger): no call, no engine
                    _err("bad_stream_token")
                    log.warning("stream_forbidden", call_id=m.start.call_sid, reason=f"bad_stream_token:{why}")
                    reason = "error:bad_stream_token"
                    await ws.close(code=1008)
                    break
                if draining():
                    if not _answered_call(cfg, token, served_here):
                        # not a call answered moments ago: a draining worker starts nothing new (1013: try again
                        # later, elsewhere)
                        _err("stream_refused_draining")
                        metrics.CALLS_TOTAL.labels("twilio", "refused_draining").inc()
                        log.warning("stream_refused_draining", call_id=m.start.call_sid,
                                    token_age_s=cfg.checker.stream_token_age(token))
                        reason = "error:refused_draining"
                        await ws.close(code=1013)
                        break
                    # answered before the drain (or by another worker): the caller is on the line, keep the call
                    log.info("stream_admitted_draining", call_id=m.start.call_sid, served_here=served_here)
                raw_leg = custom.pop(LEG_PARAM, "1")
                start = dataclasses.replace(m.start, custom=custom)
                bridge = TwilioCallBridge(start, ws.send_text, close, cfg.rest, cfg.lead_ms, dial)
                # signed with the stream's token by our own TwiML: still bounded, a bad value is a first stream
                bridge.info.leg = int(raw_leg) if raw_leg.isdigit() and 1 <= int(raw_leg) <= MAX_STREAM_LEGS else 1
                if early_media:
                    bridge.report_error("media_before_start", f"{early_media} frames")
                bridge.answered_before_drain = draining()
                call_task = asyncio.get_running_loop().create_task(on_call(bridge))
                handshakes.opening -= 1  # the call is handed over: a drain may start refusing others now
                opening = False
            elif m.event == "stop":
                reason = "stream_stopped"
                break
            # "connected": nothing to do
            if bridge is not None and bridge.ended:
                break
    except WebSocketDisconnect:
        reason = "disconnected"
    except Exception as exc:  # noqa: BLE001 - never let one socket take the worker down
        _err("stream_exception")
        log.exception("stream_exception", call_id=bridge.info.call_id if bridge else "", error=str(exc))
        reason = "error:exception"
    finally:
        if opening:  # also when the handler is cancelled (server shutdown): a leaked count would hold the drain
            handshakes.opening -= 1
            opening = False
    if bridge is not None:
        if reason == "disconnected" and not bridge.ended:
            _err("disconnected")
            log.warning("stream_vanished", call_id=bridge.info.call_id)
        bridge.end(reason)
        if call_task is not None:
            try:
                await asyncio.shield(call_task)
            except Exception:  # noqa: BLE001 - logged by the conversation
                pass
    try:
        await ws.close()
    except Exception:  # noqa: BLE001
        pass
