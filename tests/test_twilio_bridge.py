"""TwilioCallBridge on its own: re-framing, pacing bound, marks after their audio, clear, and a
socket that fails on send ending the call (no server needed)."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np

from telephony import g711
from telephony.bridge import AudioIn, CallEnded, MarkIn
from telephony.twilio import protocol
from telephony.twilio.bridge import TwilioCallBridge


class Wire:
    def __init__(self, fail_after: int | None = None) -> None:
        self.sent: list[tuple[float, dict]] = []
        self.fail_after = fail_after
        self.closed: int | None = None

    async def send(self, text: str) -> None:
        if self.fail_after is not None and len(self.sent) >= self.fail_after:
            raise ConnectionResetError("gone")
        self.sent.append((time.monotonic(), json.loads(text)))

    async def close(self, code: int) -> None:
        self.closed = code


def _bridge(wire: Wire, lead_ms: int = 120) -> TwilioCallBridge:
    start = protocol.StartInfo("MZ1", "CA1", "AC1", {"From": "+15551230000"})
    return TwilioCallBridge(start, wire.send, wire.close, None, lead_ms=lead_ms)


async def test_inbound_payloads_are_reframed_to_20ms() -> None:
    b = _bridge(Wire())
    pcm = (np.sin(np.arange(400) / 5) * 9000).astype(np.int16)
    data = g711.ulaw_encode(pcm)
    b.feed_media(data[:240], 1.0)  # 1.5 frames
    b.feed_media(data[240:400], 1.02)  # the rest: 2.5 frames in total -> 2 frames + 80 bytes kept
    frames = [b._inbox.get_nowait() for _ in range(b._inbox.qsize())]
    assert [len(f.pcm) for f in frames if isinstance(f, AudioIn)] == [160, 160]
    assert np.array_equal(np.concatenate([f.pcm for f in frames]), g711.ulaw_decode(data[:320]))
    assert b.info.caller == "+15551230000" and b.info.transport == "twilio"


async def test_outbound_is_paced_and_marks_follow_their_audio() -> None:
    wire = Wire()
    b = _bridge(wire, lead_ms=120)
    await b.send_audio(np.zeros(8000, dtype=np.int16))  # 1 s
    await b.mark("1:end1000")
    t0 = time.monotonic()
    await asyncio.sleep(0.3)
    media = [t for t, m in wire.sent if m["event"] == "media"]
    # never more than the lead ahead of real time (a loaded machine only makes it fall behind)
    assert len(media) <= int((time.monotonic() - t0 + 0.12) / 0.02) + 2
    for _ in range(100):
        if any(m["event"] == "mark" for _, m in wire.sent):
            break
        await asyncio.sleep(0.02)
    events = [m["event"] for _, m in wire.sent]
    assert events.count("media") == 50 and events[-1] == "mark"
    payload = base64.b64decode(wire.sent[0][1]["media"]["payload"])
    assert len(payload) == 160 and wire.sent[0][1]["streamSid"] == "MZ1"


async def test_clear_drops_queued_audio() -> None:
    wire = Wire()
    b = _bridge(wire)
    await b.send_audio(np.zeros(16000, dtype=np.int16))  # 2 s
    await b.mark("1:end2000")
    await asyncio.sleep(0.1)
    await b.clear()
    n = len(wire.sent)
    await asyncio.sleep(0.2)
    assert wire.sent[n - 1][1]["event"] == "clear"
    assert len(wire.sent) == n  # nothing after the clear: the rest was dropped, the mark too
    assert sum(1 for _, m in wire.sent if m["event"] == "media") < 20


async def test_send_failure_ends_the_call() -> None:
    wire = Wire(fail_after=3)
    b = _bridge(wire)
    await b.send_audio(np.zeros(4000, dtype=np.int16))
    await b.mark("x:1")
    events = []
    async for ev in b.events():
        events.append(ev)
    assert isinstance(events[-1], CallEnded) and events[-1].reason == "disconnected"
    assert not any(isinstance(e, MarkIn) for e in events)
    assert await b.transfer("general", {}) is False  # no REST configured: refused, not raised


async def test_a_stalled_event_loop_counts_late_frames() -> None:
    """Audio queued but the loop blocked: Twilio's playout runs dry, and the gap is counted as late frames
    (voicebot_late_frames_total{transport="twilio"}, as SIP and WebRTC count theirs)."""
    from ops.metrics import LATE_FRAMES

    before = LATE_FRAMES.labels("twilio")._value.get()
    wire = Wire()
    b = _bridge(wire, lead_ms=120)
    await b.send_audio(np.zeros(8000, dtype=np.int16))  # 1 s
    await asyncio.sleep(0.1)
    time.sleep(0.4)  # blocking work on the event loop: ~0.28 s past the 120 ms lead
    await asyncio.sleep(0.2)
    assert LATE_FRAMES.labels("twilio")._value.get() - before >= 5
    await b.clear()
