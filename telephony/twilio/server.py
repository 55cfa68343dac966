"""FastAPI routes for Twilio: the voice webhook (TwiML) and the Media Streams WebSocket.

Each accepted stream becomes a TwilioCallBridge handed to `on_call` (run as its own task), so a
broken peer only ever ends its own call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
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
# <Dial> DialCallStatus / <Enqueue> QueueResult values after which the caller talked to (or left for) a person
_CONNECTED = {"completed", "answered", "bridged", "bridging-in-process", "hangup", "redirected", "leave"}
# media messages tolerated before `start` (a real Twilio never sends any) before we hang up
MAX_EARLY_MEDIA = 50
MAX_RECORDED_UNKNOWN = 20  # unknown-event / wrong-stream messages recorded per call and kind (all are counted)
# A real Twilio sends `start` right after `connected`. A socket that never does would otherwise hold a
# coroutine and a file descriptor for as long as its peer keeps answering pings, i.e. forever.
START_TIMEOUT_S = 10.0
MAX_WEBHOOK_BYTES = 64 * 1024


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
        if cfg.is_draining():
            # busy: Twilio plays a busy tone and the caller can dial again (another worker/instance answers)
            metrics.CALLS_TOTAL.labels("twilio", "refused_draining").inc()
            log.info("webhook_rejected_draining", call_id=call_id)
            return Response(twiml.reject(), media_type="application/xml")
        stream_url = cfg.checker.stream_url(_host(request.headers, request.url.netloc), STREAM_PATH, "")
        params = {k: form.get(k, "") for k in ("From", "To", "CallSid", "Direction")}
        params[STREAM_TOKEN_PARAM] = cfg.checker.stream_token(call_id)  # comes back in the stream's `start`
        log.info("webhook", call_id=call_id, caller=mask_digits(form.get("From", "")))
        return Response(twiml.connect_stream(stream_url, params), media_type="application/xml")

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
        if cfg.is_draining():
            await ws.close(code=1013)
            return
        await ws.accept()
        dial = twiml.DialOptions(action_url=cfg.checker.public_url("https", host, TRANSFER_STATUS_PATH, ""),
                                 caller_id=cfg.dial_caller_id, timeout_s=cfg.dial_timeout_s)
        await _run_stream(ws, on_call, cfg, dial)

    return router


async def _run_stream(ws: WebSocket, on_call: OnCall, cfg: TwilioRouteConfig, dial: twiml.DialOptions) -> None:
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
                why = cfg.checker.check_stream_token(m.start.call_sid, custom.pop(STREAM_TOKEN_PARAM, None))
                if why:  # not a call our webhook admitted (a replayed handshake, a stranger): no call, no engine
                    _err("bad_stream_token")
                    log.warning("stream_forbidden", call_id=m.start.call_sid, reason=f"bad_stream_token:{why}")
                    reason = "error:bad_stream_token"
                    await ws.close(code=1008)
                    break
                start = dataclasses.replace(m.start, custom=custom)
                bridge = TwilioCallBridge(start, ws.send_text, close, cfg.rest, cfg.lead_ms, dial)
                if early_media:
                    bridge.report_error("media_before_start", f"{early_media} frames")
                call_task = asyncio.get_running_loop().create_task(on_call(bridge))
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
