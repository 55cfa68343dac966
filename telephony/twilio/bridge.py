"""TwilioCallBridge: one Media Streams call as a transport-neutral telephony.bridge.CallBridge.

Inbound messages are decoded straight into 20 ms int16 frames (numpy mu-law table, no resampling).
Outbound audio is mu-law encoded once per utterance and paced by one small task per call that
keeps at most `lead_ms` of audio ahead of real time at Twilio: enough to ride out event-loop
jitter, small enough that `clear` (barge-in) has little to throw away.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Awaitable, Callable

import numpy as np

from ops import metrics
from ops.logs import get_logger, mask_digits
from telephony import g711
from telephony.bridge import FRAME_SAMPLES, AudioIn, CallInfo, DtmfIn, MarkIn, QueuedCallBridge
from telephony.twilio import protocol
from telephony.twilio.rest import TwilioRest
from telephony.twilio import twiml
from telephony.twilio.twiml import DialOptions

SendText = Callable[[str], Awaitable[None]]
CloseFn = Callable[[int], Awaitable[None]]
ErrorSink = Callable[[str, str], None]

_SILENCE_BYTE = 0xFF  # mu-law silence
REST_HANGUP_S = 3.0  # the caller has heard the goodbye; past this the stream is closed anyway


class TwilioCallBridge(QueuedCallBridge):
    def __init__(
        self,
        start: protocol.StartInfo,
        send_text: SendText,
        close: CloseFn,
        rest: TwilioRest | None,
        lead_ms: int = 120,
        dial: DialOptions | None = None,
    ) -> None:
        custom = start.custom
        self.info = CallInfo(
            call_id=start.call_sid,
            transport="twilio",
            caller=custom.get("From", ""),
            called=custom.get("To", ""),
            params={"stream_sid": start.stream_sid, "account_sid": start.account_sid, **custom},
        )
        self.stream_sid = start.stream_sid
        self.started_t = time.monotonic()  # the stream's `start`: greeting latency counts from here
        self.account_sid = start.account_sid
        self._send_text = send_text
        self._close = close
        self._rest = rest
        self._dial = dial  # action URL (agent never answered: apology), caller id, ring time
        self._lead = lead_ms * 8  # samples
        self._init_queue()
        self._partial = bytearray()  # inbound mu-law not yet a whole 20 ms frame
        # Outbound queue: bytes (one 160-byte mu-law frame) or str (a mark name), in order.
        self._out: deque[bytes | str] = deque()
        self._out_ready = asyncio.Event()
        self._clock_t0 = 0.0
        self._clock_sent = 0  # samples sent since _clock_t0
        self._pacer: asyncio.Task[None] | None = None
        self._error_sink: ErrorSink | None = None
        self._pending_errors: list[tuple[str, str]] = []  # reported before a sink was installed
        self.first_frame_sent_t: float | None = None  # time the latest utterance's first frame left
        self.log = get_logger("telephony.twilio", call_id=self.info.call_id)

    # ---- inbound (called by the WebSocket loop) ----
    def feed_media(self, payload: bytes, t: float) -> None:
        if self._partial:
            self._partial.extend(payload)
            data = bytes(self._partial)
            self._partial.clear()
        else:
            data = payload
        n = len(data) // FRAME_SAMPLES
        if n:
            pcm = g711.ulaw_decode(data[: n * FRAME_SAMPLES])
            for i in range(n):
                self._inbox.put_nowait(AudioIn(pcm[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES], t))
            metrics.AUDIO_FRAMES.labels("twilio", "in").inc(n)
        rest = len(data) - n * FRAME_SAMPLES
        if rest:
            self._partial.extend(data[-rest:])

    def feed_mark(self, name: str, t: float) -> None:
        self._inbox.put_nowait(MarkIn(name, t))

    def feed_dtmf(self, digit: str, t: float) -> None:
        self._inbox.put_nowait(DtmfIn(digit, t))

    def report_error(self, kind: str, detail: str) -> None:
        if self._error_sink is not None:
            self._error_sink(kind, detail)
        else:
            self._pending_errors.append((kind, detail))

    def set_error_sink(self, sink: ErrorSink) -> None:
        """The conversation records protocol errors (non-fatal ones included) in the call's events."""
        self._error_sink = sink
        pending, self._pending_errors = self._pending_errors, []
        for kind, detail in pending:
            sink(kind, detail)

    def _on_end(self) -> None:
        self._out.clear()
        self._out_ready.set()  # wake the pacer so it sees the end

    # ---- CallBridge ----
    async def send_audio(self, pcm: np.ndarray) -> None:
        if self._ended or len(pcm) == 0:
            return
        data = g711.ulaw_encode(pcm)
        pad = (-len(data)) % FRAME_SAMPLES
        if pad:
            data += bytes([_SILENCE_BYTE]) * pad
        mv = memoryview(data)
        self._out.extend(bytes(mv[i : i + FRAME_SAMPLES]) for i in range(0, len(data), FRAME_SAMPLES))
        self._kick()

    async def mark(self, name: str) -> None:
        if self._ended:
            return
        self._out.append(name)
        self._kick()

    async def clear(self) -> None:
        self._out.clear()
        self._clock_sent = 0
        self._clock_t0 = 0.0
        if not self._ended:
            await self._safe_send(protocol.clear_msg(self.stream_sid))

    @property
    def can_transfer(self) -> bool:
        return self._rest is not None  # the live call is moved with a REST update

    async def transfer(self, target: str, context: dict[str, Any]) -> bool:
        label = mask_digits(target)  # a dialed number is a person's: never a raw metric label
        if self._rest is None:
            self.log.warning("transfer_unavailable", target=target,
                             reason="Twilio REST not configured (TWILIO_AUTH_TOKEN / TWILIO_ACCOUNT_SID)")
            metrics.TRANSFERS.labels("twilio", label, "unconfigured").inc()
            metrics.ERRORS.labels("twilio", "transfer_unconfigured").inc()
            return False
        res = await self._rest.transfer(self.info.call_id, target, self.account_sid,
                                        still_live=lambda: not self._ended, dial=self._dial)
        if res.ok:
            result = "ok"
        elif res.result == "unconfigured":
            result = "unconfigured"
        elif self._ended:
            result = "caller_hangup"  # the same values as SIP: nobody left to move
        # (call_gone with our stream still up is a wrong account SID / URL, not a hang-up: "failed")
        else:
            result = "failed"
        metrics.TRANSFERS.labels("twilio", label, result).inc()
        if res.ok:
            if res.attempts > 1:
                self.log.info("transfer_retried_ok", target=target, attempts=res.attempts)
            return True
        # why, for the on-call engineer: Twilio's status and error code (20003: credentials, 21220: call over, ...)
        self.log.warning("transfer_failed", target=target, result=res.result, status=res.status,
                         twilio_code=res.code, twilio_message=res.message, attempts=res.attempts,
                         caller_gone=self._ended)
        metrics.ERRORS.labels("twilio", f"transfer_{res.result}").inc()
        return False

    async def hangup_unshared(self, reason: str = "completed") -> None:
        """Closing the stream makes Twilio ask what next (<Connect action>), of any worker; one that cannot read
        this call's end from Redis takes the closed stream for a lost one and gives the caller a new stream:
        during an outage a goodbye would come back as "Sorry, we were cut off" up to three times. A REST update
        to <Hangup/> ends the call without asking anyone. Without REST credentials, or if Twilio does not take
        it in time, the stream is closed as usual."""
        if self._rest is not None and not self._ended:
            self.end(f"bot:{reason}")  # ours, whatever the stream's `stop` says next
            try:
                res = await asyncio.wait_for(self._rest.update_call(self.info.call_id, twiml.hangup(),
                                                                    self.account_sid, still_live=lambda: True),
                                             REST_HANGUP_S)
                result = res.result if not res.ok else "ok"
                detail = {"status": res.status, "twilio_code": res.code, "attempts": res.attempts}
            except asyncio.TimeoutError:
                result, detail = "timeout", {}
            metrics.TWILIO_REST_HANGUPS.labels(result).inc()
            (self.log.info if result == "ok" else self.log.warning)("hangup_over_rest", reason=reason,
                                                                   result=result, **detail)
        await self.hangup(reason)

    async def hangup(self, reason: str = "completed") -> None:
        """With <Connect><Stream> and nothing after it, closing the socket ends the call."""
        self.end(f"bot:{reason}")
        try:
            await self._close(1000)
        except Exception:  # noqa: BLE001 - the socket may already be gone
            pass

    # ---- outbound pacing ----
    def _kick(self) -> None:
        self._out_ready.set()
        if self._pacer is None or self._pacer.done():
            self._pacer = asyncio.get_running_loop().create_task(self._pace())

    async def _safe_send(self, text: str) -> bool:
        try:
            await self._send_text(text)
            return True
        except Exception as exc:  # noqa: BLE001 - a vanished socket ends the call, never the worker
            if not self._ended:
                # counted here when a send notices the vanished socket before the receive loop does
                metrics.ERRORS.labels("twilio", "disconnected").inc()
                self.log.warning("stream_vanished", error=type(exc).__name__, noticed_by="send")
            self.end("disconnected")
            return False

    async def _pace(self) -> None:
        tick = max(0.02, self._lead / 8000 / 2)
        backlog = False  # audio was waiting when we last slept: Twilio's buffer running dry now is our lateness
        while not self._ended:
            if not self._out:
                self._out_ready.clear()
                backlog = False
                try:
                    await asyncio.wait_for(self._out_ready.wait(), timeout=5.0)
                except asyncio.TimeoutError:
                    return
                continue
            now = time.monotonic()
            dry = int((now - self._clock_t0) * 8000) - self._clock_sent
            if backlog and self._clock_t0 and dry >= FRAME_SAMPLES:
                # a stalled event loop: the caller hears a gap of `dry` samples (SIP/WebRTC count the same)
                metrics.LATE_FRAMES.labels("twilio").inc(dry // FRAME_SAMPLES)
            if self._clock_t0 == 0.0 or (now - self._clock_t0) * 8000 > self._clock_sent + self._lead:
                # idle (or starved) playout restarts the clock: Twilio plays from "now"
                self._clock_t0, self._clock_sent = now, 0
            budget = int((now - self._clock_t0) * 8000) + self._lead - self._clock_sent
            first = self._clock_sent == 0
            sent = 0
            while self._out and budget >= FRAME_SAMPLES:
                item = self._out.popleft()
                if isinstance(item, str):
                    if not await self._safe_send(protocol.mark_msg(self.stream_sid, item)):
                        return
                    continue
                if first:
                    self.first_frame_sent_t = time.monotonic()
                    first = False
                if not await self._safe_send(protocol.media_msg(self.stream_sid, item)):
                    return
                self._clock_sent += FRAME_SAMPLES
                budget -= FRAME_SAMPLES
                sent += 1
            # trailing marks go out right after the audio they follow
            while self._out and isinstance(self._out[0], str):
                if not await self._safe_send(protocol.mark_msg(self.stream_sid, self._out.popleft())):
                    return
            if sent:
                metrics.AUDIO_FRAMES.labels("twilio", "out").inc(sent)
            backlog = bool(self._out)
            await asyncio.sleep(tick)
