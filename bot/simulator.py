"""A caller over the Twilio protocol, as a reusable async library (tests, `bot call`, benchmarks).

It behaves like Twilio's side of a call: POSTs the voice webhook (signed when given a token),
follows the TwiML to the Media Streams WebSocket (the upgrade signed too), sends `connected` and
`start`, then a steady 20 ms stream of mu-law frames: silence, or the caller's WAV turns in real
time. Bot audio is "played" in real time through a playout buffer; `mark`s are echoed once the
audio before them has played, `clear` empties the buffer (and returns its marks, as Twilio does).
Everything the bot said lands in a recording; per turn it measures voice-to-voice latency at the
caller (end of the caller's audio -> first bot audio played).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from xml.etree import ElementTree

import httpx
import numpy as np
import soundfile as sf
import websockets
from twilio.request_validator import RequestValidator

from telephony import g711

FRAME = 160
SILENCE = b"\xff" * FRAME


def load_wav_8k(path: str | Path) -> np.ndarray:
    """8 kHz mono int16 (resampled linearly if the file is at another rate)."""
    data, sr = sf.read(str(path), dtype="int16", always_2d=True)
    x = data[:, 0]
    if sr != 8000:
        n = int(round(len(x) * 8000 / sr))
        x = np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x.astype(np.float32)).astype(np.int16)
    return x


@dataclass
class TurnResult:
    n: int
    wav: str
    caller_audio_ms: int
    v2v_ms: float | None  # end of caller audio -> first bot audio played at the caller
    bot_audio_ms: int  # how much bot audio played in response
    interrupted_bot: bool = False

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class CallResult:
    call_sid: str
    greeting_ms: float | None  # stream start -> first bot audio received
    turns: list[TurnResult] = field(default_factory=list)
    clears: int = 0
    marks_echoed: int = 0
    ended_by: str = ""
    bot_audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    events: list[tuple[float, str]] = field(default_factory=list)  # (t since start, what)
    record: dict[str, Any] | None = None
    reconnects: int = 0  # streams the bot gave the call again after one was lost (<Connect action>)
    reconnect_played: list[int] = field(default_factory=list)  # bot samples played before each new stream
    final_twiml: str = ""  # the TwiML the call ended on (after its stream): <Hangup/>, an apology, a transfer

    def summary(self) -> dict[str, Any]:
        return {"call_sid": self.call_sid, "greeting_ms": self.greeting_ms, "clears": self.clears,
                "marks_echoed": self.marks_echoed, "ended_by": self.ended_by,
                "bot_audio_ms": len(self.bot_audio) * 1000 // 8000, "turns": [t.to_dict() for t in self.turns]}


class Playout:
    """Twilio's outbound buffer: bot frames and marks, played out at real time."""

    def __init__(self) -> None:
        self.q: deque[bytes | str] = deque()
        self.played: list[np.ndarray] = []
        self.first_play_t: float | None = None
        self.last_play_t: float | None = None
        self.played_samples = 0
        self.watch_from: int | None = None  # report when audio beyond this sample count plays
        self.watch_t: float | None = None

    def busy(self) -> bool:
        return any(isinstance(x, bytes) for x in self.q)


class TwilioCaller:
    def __init__(self, base_url: str, auth_token: str = "", account_sid: str = "AC" + "0" * 32,
                 from_number: str = "+15550100123", to_number: str = "+15550100999", call_sid: str | None = None,
                 stream_url: str | None = None, echo_db: float | None = None, follow_action: bool = True) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = auth_token
        self.account_sid = account_sid
        self.from_number = from_number
        self.to_number = to_number
        self.call_sid = call_sid or "CA" + uuid.uuid4().hex
        self.stream_sid = "MZ" + uuid.uuid4().hex
        self.stream_url_override = stream_url
        # line echo: the bot's audio comes back in the caller's direction at this level (e.g. -20 dB)
        self.echo_gain = None if echo_db is None else 10 ** (echo_db / 20)
        self.last_played: np.ndarray | None = None
        self.play = Playout()
        self._ws: Any = None
        self._t0 = 0.0
        self._stopped = asyncio.Event()
        self._closed_by_bot = False
        self.result = CallResult(self.call_sid, None)
        self._mic: deque[bytes] = deque()  # caller frames queued to send
        self._mic_done = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        # as Twilio: when the stream ends, request <Connect action> and do what it says (hang up, or a new
        # stream for the same call). False: the call ends with its stream (a replayed or hostile stream)
        self.follow_action = follow_action
        self._action = ""
        self._leaving = False  # the caller hung up / dropped: no action is requested after that

    # ---- signaling ----
    def sign(self, url: str, params: dict[str, str]) -> str:
        return RequestValidator(self.token).compute_signature(url, params)

    async def webhook(self, client: httpx.AsyncClient, signature: str | None = None) -> httpx.Response:
        url = f"{self.base_url}/twilio/voice"
        form = {"CallSid": self.call_sid, "AccountSid": self.account_sid, "From": self.from_number,
                "To": self.to_number, "Direction": "inbound", "CallStatus": "ringing"}
        headers = {}
        if signature is not None:
            headers["X-Twilio-Signature"] = signature
        elif self.token:
            headers["X-Twilio-Signature"] = self.sign(url, form)
        return await client.post(url, data=form, headers=headers)

    @staticmethod
    def parse_twiml(xml: str) -> tuple[str, dict[str, str]]:
        root = ElementTree.fromstring(xml)
        stream = root.find("./Connect/Stream")
        if stream is None:
            raise RuntimeError(f"TwiML has no <Connect><Stream>: {xml[:200]}")
        params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
        return stream.get("url", ""), params

    def ws_url(self, twiml_url: str) -> str:
        """Connect where the TwiML says, over plain ws to our local server (tests have no TLS)."""
        if self.stream_url_override:
            return self.stream_url_override
        parts = urlsplit(twiml_url)
        base = urlsplit(self.base_url)
        scheme = "wss" if base.scheme == "https" else "ws"
        return urlunsplit((scheme, base.netloc, parts.path, parts.query, ""))

    async def connect(self, signature: str | None = None, sign_url: str | None = None,
                      start_delay_s: float = 0.0) -> None:
        """Webhook, then the stream: `connected` and `start` (start_delay_s after it: a slow Twilio edge)."""
        async with httpx.AsyncClient(timeout=10) as client:
            resp = await self.webhook(client)
        resp.raise_for_status()
        await self._open_stream(resp.text, signature, sign_url, start_delay_s, first=True)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._receiver()), loop.create_task(self._clock())]

    @staticmethod
    def connect_action(xml: str) -> str:
        """The <Connect action> URL of a TwiML document ('' if none)."""
        connect = ElementTree.fromstring(xml).find("./Connect")
        return "" if connect is None else connect.get("action", "")

    async def _open_stream(self, xml: str, signature: str | None = None, sign_url: str | None = None,
                           start_delay_s: float = 0.0, first: bool = False) -> None:
        twiml_url, params = self.parse_twiml(xml)
        self._action = self.connect_action(xml)
        headers = {}
        if signature is not None:
            headers["X-Twilio-Signature"] = signature
        elif self.token:
            headers["X-Twilio-Signature"] = self.sign(sign_url or twiml_url, {})
        self._ws = await websockets.connect(self.ws_url(twiml_url), additional_headers=headers, max_size=2**20)
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        if start_delay_s > 0:
            await asyncio.sleep(start_delay_s)
        if first:
            self._t0 = time.monotonic()
        await self._send({"event": "start", "sequenceNumber": "1", "streamSid": self.stream_sid, "start": {
            "accountSid": self.account_sid, "streamSid": self.stream_sid, "callSid": self.call_sid,
            "tracks": ["inbound"], "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": params}})

    async def _after_stream(self) -> bool:
        """The stream ended without the caller leaving: request <Connect action> as Twilio does. True when it
        answered with a new stream (now open); otherwise the call is over (its TwiML kept in the result)."""
        if not (self.follow_action and self._action) or self._leaving:
            return False
        form = {"CallSid": self.call_sid, "AccountSid": self.account_sid, "From": self.from_number,
                "To": self.to_number, "Direction": "inbound", "CallStatus": "in-progress"}
        url = self._action
        headers = {"X-Twilio-Signature": self.sign(url, form)} if self.token else {}
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                resp = await client.post(url, data=form, headers=headers)
        except httpx.HTTPError as exc:
            self.result.final_twiml = f"action request failed: {exc!r}"  # Twilio: application error, call over
            return False
        self.result.final_twiml = resp.text
        if resp.status_code != 200 or ElementTree.fromstring(resp.text).find("./Connect/Stream") is None:
            return False
        # Twilio stops playing what the lost stream had queued; a new stream has its own id
        self.play.q.clear()
        self.stream_sid = "MZ" + uuid.uuid4().hex
        await self._open_stream(resp.text)
        self.result.reconnects += 1
        self.result.reconnect_played.append(self.play.played_samples)
        self._ev("reconnected")
        return True

    async def _send(self, obj: dict[str, Any] | str) -> None:
        await self._ws.send(obj if isinstance(obj, str) else json.dumps(obj))

    async def send_raw(self, text: str) -> None:
        """Send anything (bad-input tests)."""
        await self._ws.send(text)

    def _ev(self, what: str) -> None:
        self.result.events.append((time.monotonic() - self._t0, what))

    # ---- the line: 20 ms ticks, one frame each way ----
    async def _clock(self) -> None:
        seq = 2
        next_t = time.monotonic()
        try:
            while not self._stopped.is_set():
                now = time.monotonic()
                ticks = max(1, int((now - next_t) / 0.02) + 1) if now >= next_t else 0
                for _ in range(ticks):
                    frame = self._mic.popleft() if self._mic else SILENCE
                    if not self._mic:
                        self._mic_done.set()
                    if self.echo_gain is not None and self.last_played is not None:
                        mix = g711.ulaw_decode(frame).astype(np.float32) + self.last_played * self.echo_gain
                        frame = g711.ulaw_encode(np.clip(mix, -32768, 32767).astype(np.int16))
                    self.last_played = None
                    seq += 1
                    try:
                        await self._send('{"event":"media","sequenceNumber":"%d","streamSid":"%s","media":'
                                         '{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%s"}}'
                                         % (seq, self.stream_sid, seq, seq * 20, base64.b64encode(frame).decode()))
                    except (websockets.ConnectionClosed, OSError):
                        if not (self.follow_action and self._action):
                            raise
                        # the stream is down: the frame is lost, as on the real line while Twilio reconnects
                    self._play_one()
                    next_t += 0.02
                await asyncio.sleep(max(0.0, next_t - time.monotonic()))
        except (websockets.ConnectionClosed, OSError):
            self._stopped.set()

    def _play_one(self) -> None:
        """Play 20 ms of bot audio; echo marks that have come due."""
        q = self.play.q
        while q and isinstance(q[0], str):
            name = q.popleft()
            asyncio.get_running_loop().create_task(self._echo_mark(name))
        if q:
            frame = q.popleft()
            assert isinstance(frame, bytes)
            now = time.monotonic()
            if self.play.first_play_t is None:
                self.play.first_play_t = now
            self.play.last_play_t = now
            pcm = g711.ulaw_decode(frame)
            self.play.played.append(pcm)
            self.play.played_samples += len(pcm)
            self.last_played = pcm
            if self.play.watch_from is not None and self.play.watch_t is None:
                self.play.watch_t = now
            while q and isinstance(q[0], str):
                asyncio.get_running_loop().create_task(self._echo_mark(q.popleft()))

    async def _echo_mark(self, name: str) -> None:
        try:
            await self._send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})
            self.result.marks_echoed += 1
        except (websockets.ConnectionClosed, OSError):
            pass

    async def _receiver(self) -> None:
        try:
            while True:
                await self._receive_stream()
                if not await self._after_stream():
                    break
            self._closed_by_bot = True
            self.result.ended_by = self.result.ended_by or "bot"
        finally:
            self._stopped.set()

    async def _receive_stream(self) -> None:
        try:
            async for raw in self._ws:
                msg = json.loads(raw)
                ev = msg.get("event")
                if ev == "media":
                    payload = base64.b64decode(msg["media"]["payload"])
                    if self.result.greeting_ms is None:
                        self.result.greeting_ms = (time.monotonic() - self._t0) * 1000
                    for i in range(0, len(payload), FRAME):
                        self.play.q.append(payload[i : i + FRAME])
                elif ev == "mark":
                    self.play.q.append(msg["mark"]["name"])
                elif ev == "clear":
                    self.result.clears += 1
                    self._ev("clear")
                    marks = [x for x in self.play.q if isinstance(x, str)]
                    self.play.q.clear()
                    for name in marks:
                        await self._echo_mark(name)
        except websockets.ConnectionClosed:
            pass

    # ---- caller actions ----
    @property
    def ended(self) -> bool:
        return self._stopped.is_set()

    def bot_idle_since(self) -> float | None:
        if self.play.busy():
            return None
        return self.play.last_play_t

    async def wait_bot_quiet(self, quiet_s: float = 0.8, timeout_s: float = 20.0, need_audio: bool = True) -> bool:
        """Until the bot has said something and then been silent for quiet_s."""
        deadline = time.monotonic() + timeout_s
        start_samples = self.play.played_samples
        while time.monotonic() < deadline and not self.ended:
            last = self.bot_idle_since()
            heard = self.play.played_samples > start_samples or not need_audio
            if heard and last is not None and time.monotonic() - last >= quiet_s and not self.play.busy():
                return True
            if not need_audio and last is None and time.monotonic() - self._t0 > quiet_s and not self.play.busy():
                return True
            await asyncio.sleep(0.02)
        return False

    async def say(self, pcm: np.ndarray, wav_name: str = "", wait_reply_s: float = 12.0,
                  quiet_s: float = 0.8) -> TurnResult:
        """Speak `pcm` in real time, then wait for the bot's reply to finish."""
        n = len(self.result.turns) + 1
        data = g711.ulaw_encode(pcm)
        pad = (-len(data)) % FRAME
        data += b"\xff" * pad
        was_playing = self.play.busy()
        self._mic_done.clear()
        for i in range(0, len(data), FRAME):
            self._mic.append(data[i : i + FRAME])
        await self._mic_done.wait()
        # voice-to-voice counts from the end of the caller's speech, not of the file's trailing silence
        loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > 300)
        trailing_s = (len(pcm) - (loud[-1] + 1)) / 8000 if len(loud) else 0.0
        t_end = time.monotonic() - trailing_s
        before = self.play.played_samples
        self._ev(f"turn{n}_end")
        # reply: the first bot audio played after the end of our speech
        self.play.watch_t = None
        self.play.watch_from = before
        v2v = None
        deadline = t_end + wait_reply_s
        while time.monotonic() < deadline and not self.ended:
            if self.play.watch_t is not None:
                v2v = (self.play.watch_t - t_end) * 1000
                break
            await asyncio.sleep(0.005)
        self.play.watch_from = None
        if v2v is not None:
            await self.wait_bot_quiet(quiet_s=quiet_s, timeout_s=wait_reply_s, need_audio=False)
        res = TurnResult(n, wav_name, len(pcm) * 1000 // 8000, None if v2v is None else round(v2v, 1),
                         (self.play.played_samples - before) * 1000 // 8000, interrupted_bot=was_playing)
        self.result.turns.append(res)
        return res

    async def send_dtmf(self, digit: str) -> None:
        await self._send({"event": "dtmf", "streamSid": self.stream_sid, "dtmf": {"track": "inbound_track", "digit": digit}})

    async def hangup(self) -> None:
        self._leaving = True
        if self._ws is not None and not self.ended:
            try:
                await self._send({"event": "stop", "streamSid": self.stream_sid,
                                  "stop": {"accountSid": self.account_sid, "callSid": self.call_sid}})
                self.result.ended_by = self.result.ended_by or "caller"
            except (websockets.ConnectionClosed, OSError):
                pass
        await self.close()

    async def vanish(self) -> None:
        """Drop the TCP connection without a close handshake (a network failure)."""
        self._leaving = True
        self._stopped.set()
        transport = getattr(self._ws, "transport", None)
        if transport is not None:
            transport.abort()
        await self.close()

    def drop_stream(self) -> None:
        """Break the media stream's TCP connection with the caller still on the line (the network between
        Twilio and the bot failed, or the bot's worker died): Twilio then asks <Connect action> what next."""
        transport = getattr(self._ws, "transport", None)
        if transport is not None:
            transport.abort()

    async def close(self) -> None:
        self._leaving = True
        self._stopped.set()
        for t in self._tasks:
            t.cancel()
        if self._ws is not None:
            try:
                await asyncio.wait_for(self._ws.close(), 2)
            except Exception:  # noqa: BLE001
                pass
        if self.play.played:
            self.result.bot_audio = np.concatenate(self.play.played)

    async def wait_ended(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False


async def fetch_call(base_url: str, call_sid: str, redis_url: str | None) -> dict[str, Any] | None:
    """The call's record + events from Redis (the bot's decisions per turn)."""
    if not redis_url:
        return None
    from bot.state import CallStore, connect

    store = CallStore(connect(redis_url), worker="simulator", ttl_s=60)
    try:
        return await store.get_call(call_sid)
    finally:
        await store.r.aclose()


async def run_call(base_url: str, wavs: list[str | Path], auth_token: str = "", record: str | None = None,
                   redis_url: str | None = None, greeting_timeout_s: float = 10.0, reply_timeout_s: float = 12.0,
                   hangup_after: bool = True, account_sid: str | None = None) -> CallResult:
    """Place one call: greeting, each WAV as a caller turn, hang up; optional recording."""
    caller = TwilioCaller(base_url, auth_token, **({"account_sid": account_sid} if account_sid else {}))
    await caller.connect()
    await caller.wait_bot_quiet(quiet_s=0.6, timeout_s=greeting_timeout_s)
    for w in wavs:
        if caller.ended:
            break
        await caller.say(load_wav_8k(w), str(w), wait_reply_s=reply_timeout_s)
    if hangup_after:
        await caller.hangup()
    else:
        await caller.close()
    res = caller.result
    if record:
        sf.write(record, res.bot_audio, 8000, subtype="PCM_16")
    await asyncio.sleep(0.3)  # let the bot flush the call's last events
    res.record = await fetch_call(base_url, caller.call_sid, redis_url)
    return res


def turn_decisions(record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per caller turn: what the bot understood and decided, from the call's event stream."""
    if not record:
        return []
    out = []
    for e in record["events"]:
        if e.get("type") == "turn":
            d = e.get("decision") or {}
            out.append({"n": e.get("n"), "intent": e.get("intent"), "confidence": e.get("confidence"),
                        "action": d.get("action"), "reason": d.get("reason"), "prompt": d.get("prompt"),
                        "eot_wait_ms": e.get("eot_wait_ms"), "understand_ms": e.get("understand_ms"),
                        "transcript": e.get("transcript")})
    first: dict[Any, float] = {}
    for e in record["events"]:  # server side: turn declared complete -> first bot audio sent
        if e.get("type") == "first_audio" and e.get("turn") not in first:
            first[e.get("turn")] = e.get("latency_ms")
    for d in out:
        d["server_latency_ms"] = first.get(d["n"])
    return out
