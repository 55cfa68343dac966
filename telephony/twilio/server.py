"""FastAPI routes for Twilio: the voice webhook (TwiML) and the Media Streams WebSocket.

Each accepted stream becomes a TwilioCallBridge handed to `on_call` (run as its own task), so a
broken peer only ever ends its own call.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Awaitable, Callable

from fastapi import APIRouter, Request, Response, WebSocket
from starlette.websockets import WebSocketDisconnect

from ops import metrics
from ops.logs import get_logger, mask_digits
from telephony.twilio import protocol, twiml
from telephony.twilio.bridge import TwilioCallBridge
from telephony.twilio.rest import TwilioRest
from telephony.twilio.signature import SignatureChecker

OnCall = Callable[[TwilioCallBridge], Awaitable[None]]
log = get_logger("telephony.twilio")

STREAM_PATH = "/twilio/stream"
# media messages tolerated before `start` (a real Twilio never sends any) before we hang up
MAX_EARLY_MEDIA = 50
MAX_RECORDED_UNKNOWN = 20  # unknown-event / wrong-stream messages recorded per call and kind (all are counted)
# A real Twilio sends `start` right after `connected`. A socket that never does would otherwise hold a
# coroutine and a file descriptor for as long as its peer keeps answering pings, i.e. forever.
START_TIMEOUT_S = 10.0


@dataclass
class TwilioRouteConfig:
    checker: SignatureChecker
    rest: TwilioRest | None
    public_url: str = ""
    lead_ms: int = 120
    max_bad_messages: int = 0  # bad messages tolerated per call; the next one ends it
    is_draining: Callable[[], bool] = lambda: False
    start_timeout_s: float = START_TIMEOUT_S  # no `start` this long after accept: the socket is closed


def _err(kind: str) -> None:
    metrics.ERRORS.labels("twilio", kind).inc()


def make_router(on_call: OnCall, cfg: TwilioRouteConfig) -> APIRouter:
    router = APIRouter()

    @router.post("/twilio/voice")
    async def voice(request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        sig = request.headers.get("x-twilio-signature")
        url = cfg.checker.public_url(request.url.scheme, request.headers.get("host", request.url.netloc),
                                     request.url.path, request.url.query)
        if not cfg.checker.valid_webhook(url, form, sig):
            _err("bad_signature")
            log.warning("webhook_forbidden", call_id=form.get("CallSid", ""), reason="bad_signature")
            return Response("forbidden", status_code=403)
        if cfg.is_draining():
            log.info("webhook_rejected_draining", call_id=form.get("CallSid", ""))
            return Response(twiml.reject(), media_type="application/xml")
        host = request.headers.get("host", request.url.netloc)
        stream_url = cfg.checker.public_url("wss", host, STREAM_PATH, "")
        params = {k: form.get(k, "") for k in ("From", "To", "CallSid", "Direction")}
        log.info("webhook", call_id=form.get("CallSid", ""), caller=mask_digits(form.get("From", "")))
        return Response(twiml.connect_stream(stream_url, params), media_type="application/xml")

    @router.websocket(STREAM_PATH)
    async def stream(ws: WebSocket) -> None:
        sig = ws.headers.get("x-twilio-signature")
        host = ws.headers.get("host", "")
        if not cfg.checker.valid_stream(host, ws.url.path, ws.url.query, sig):
            _err("bad_signature")
            log.warning("stream_forbidden", reason="bad_signature")
            await ws.close(code=1008)  # before accept: the upgrade is answered with HTTP 403
            return
        if cfg.is_draining():
            await ws.close(code=1013)
            return
        await ws.accept()
        await _run_stream(ws, on_call, cfg)

    return router


async def _run_stream(ws: WebSocket, on_call: OnCall, cfg: TwilioRouteConfig) -> None:
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
                bridge = TwilioCallBridge(m.start, ws.send_text, close, cfg.rest, cfg.lead_ms)
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
