"""WebRTC bridge (aiortc): one browser peer connection as a telephony.bridge.CallBridge.

The browser sends Opus at 48 kHz; aiortc decodes it to PCM, which is downmixed, low-pass filtered
and decimated 6:1 to the bot's 8 kHz and cut into 20 ms frames. Bot audio goes the other way: 8 kHz frames are
upsampled to 48 kHz and handed to aiortc's Opus encoder by an outbound track that paces itself
at one 20 ms frame per 20 ms (silence when the bot is quiet, so the RTP clock never stalls).
Marks fire when the frame before them has been sent to the browser. No transfer (a browser is not on
the phone network): transfer() returns False and the conversation falls back. Keypad: aiortc negotiates no
telephone-event, so the console sends keys as text on an RTCDataChannel labelled "dtmf"; they become DtmfIn
like RFC 4733 digits on SIP (only 0-9*#, rate-limited, bad input refused on the channel, counted and logged).
It rides the call's own peer connection, so it reaches the worker that holds the call with any number of
workers, and only the caller of that call can press keys on it.
Offers a browser would not send (no audio from the caller, no codec in common, over 64 KB or 100 ICE
candidates) are refused with a SignallingError and counted; video and extra audio sections are answered
inactive.
Imports nothing from bot/, policies/ or engine/.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import os
import secrets
import time
from collections import deque
from typing import Any, NoReturn

import numpy as np
import soxr
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

from ops import metrics
from ops.logs import get_logger
from telephony.bridge import FRAME_SAMPLES, AudioIn, CallInfo, DtmfIn, MarkIn, QueuedCallBridge

WEB_RATE = 48000
BOT_RATE = 8000
WEB_FRAME = WEB_RATE // 50  # 960 samples = 20 ms at 48 kHz
# A browser's offer is 2-8 KB with a handful of candidates. aiortc pairs remote candidates on the event
# loop in quadratic time (2,000 candidates stall every call in the worker for seconds), so an offer
# far past a browser's is refused before aiortc sees it.
MAX_OFFER_BYTES = 64 * 1024
MAX_OFFER_CANDIDATES = 100
CLOSE_TIMEOUT_S = 5.0  # aiortc's close waits on its transports; never let one hold a call's task forever
DTMF_CHANNEL = "dtmf"  # the console's keypad channel (any other data channel is refused)
DTMF_KEYS = frozenset("0123456789*#")
# A person presses a few keys a second; a script must not flood the conversation's DTMF handling (each key
# interrupts the bot's prompt and restarts the inter-digit timer). Messages (bad ones included) and keys
# each draw on a bucket: DTMF_BURST at once, then DTMF_RATE_PER_S.
DTMF_RATE_PER_S = 10.0
DTMF_BURST = 20.0
DTMF_MAX_KEYS = int(DTMF_BURST)  # one message: a key, or a typed string like "50#" (never more than a burst)


def _lowpass(cutoff_hz: float, rate: int, taps: int = 121) -> np.ndarray:
    n = np.arange(taps) - (taps - 1) / 2
    h = np.sinc(2 * cutoff_hz / rate * n) * np.hamming(taps)
    return h / h.sum()


class _Up6:
    """8 kHz -> 48 kHz, one 20 ms frame in, one out. A streaming resampler (soxr) emits audio in
    bursts of ~150 ms, which a fixed-rate RTP track cannot carry; a zero-stuffing FIR keeps 1:6 exact."""

    def __init__(self) -> None:
        self.h = _lowpass(3800, WEB_RATE) * 6
        self.tail = np.zeros(len(self.h) - 1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = np.zeros(len(x) * 6)
        z[::6] = x
        buf = np.concatenate([self.tail, z])
        self.tail = buf[len(z):]
        return np.clip(np.convolve(buf, self.h, mode="valid"), -32768, 32767).astype(np.int16)


class _Down6:
    """48 kHz -> 8 kHz: anti-alias FIR, then every 6th sample with the phase carried across frames."""

    def __init__(self) -> None:
        self.h = _lowpass(3600, WEB_RATE)
        self.tail = np.zeros(len(self.h) - 1)
        self.pos = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        buf = np.concatenate([self.tail, x.astype(np.float64)])
        self.tail = buf[len(x):]
        y = np.convolve(buf, self.h, mode="valid")[self.pos::6]
        self.pos = (self.pos - len(x)) % 6
        return np.clip(y, -32768, 32767).astype(np.int16)


class _Passthrough:
    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x


class _Soxr:
    """Other rates (rare): soxr's stream resampler; its bursts only add inbound latency."""

    def __init__(self, rate: int) -> None:
        self.rs = soxr.ResampleStream(rate, BOT_RATE, 1, dtype="int16")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.rs.resample_chunk(x)


def _downsampler(rate: int) -> "_Down6 | _Passthrough | _Soxr":
    return _Down6() if rate == WEB_RATE else _Passthrough() if rate == BOT_RATE else _Soxr(rate)


async def wait_first(events: tuple[asyncio.Event, ...], timeout_s: float) -> bool:
    """Wait until any of `events` is set or `timeout_s` passes; True when one was set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    return bool(done)


class SignallingError(ValueError):
    """The browser's offer could not be used (malformed SDP, no audio)."""


class _Bucket:
    """Token bucket: take(n) is True when n tokens were there."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens, self.t = rate, burst, burst, time.monotonic()

    def take(self, n: float = 1.0) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True


class _BotTrack(MediaStreamTrack):
    """Outbound audio: what the bot says, 20 ms at a time, paced to real time."""

    kind = "audio"

    def __init__(self, bridge: "WebRTCCallBridge") -> None:
        super().__init__()
        self._bridge = bridge
        self._up = _Up6()
        self._start: float | None = None
        self._pts = 0

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += WEB_FRAME
            wait = self._start + self._pts / WEB_RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            elif wait < -0.02:
                metrics.LATE_FRAMES.labels("webrtc").inc()
        pcm48 = self._up(self._bridge._next_out_frame())
        if self._bridge._stereo_out:
            # aiortc's Opus encoder is stereo: a mono frame would be upmixed by libswresample at -3 dB
            # per channel (pan law), so the caller heard every prompt 3 dB quieter than rendered
            frame = AudioFrame.from_ndarray(np.repeat(pcm48, 2).reshape(1, -1), format="s16", layout="stereo")
        else:
            frame = AudioFrame.from_ndarray(pcm48.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = WEB_RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, WEB_RATE)
        return frame


def ice_servers(raw: str | None = None) -> list[dict[str, Any]]:
    """STUN/TURN servers for both ends of a softphone call, from BOT_WEBRTC_ICE_SERVERS: a JSON list in
    the browser's RTCIceServer shape, e.g. [{"urls": "stun:stun.example.org:3478"}, {"urls":
    "turn:turn.example.org:3478?transport=udp", "username": "bot", "credential": "..."}].
    Default: none (host candidates only: same machine / LAN / VPN). Not aiortc's own default, which
    would contact Google's public STUN server on every call: no network use that nobody configured."""
    raw = os.environ.get("BOT_WEBRTC_ICE_SERVERS", "") if raw is None else raw
    if not raw.strip():
        return []
    try:
        servers = json.loads(raw)
        if not isinstance(servers, list):
            raise ValueError("not a JSON list")
        out = []
        for s in servers:
            urls = s["urls"]
            if not (isinstance(urls, str) or (isinstance(urls, list) and all(isinstance(u, str) for u in urls))):
                raise ValueError(f"urls must be a string or a list of strings: {urls!r}")
            for u in [urls] if isinstance(urls, str) else urls:
                if not u.startswith(("stun:", "stuns:", "turn:", "turns:")):
                    raise ValueError(f"not a stun:/turn: URI: {u!r}")
            out.append({k: s[k] for k in ("urls", "username", "credential") if k in s})
        return out
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"BOT_WEBRTC_ICE_SERVERS: {exc}") from exc


class WebRTCCallBridge(QueuedCallBridge):
    def __init__(self, caller: str = "browser", params: dict[str, Any] | None = None,
                 connect_timeout_s: float = 20.0, servers: list[dict[str, Any]] | None = None,
                 media_timeout_s: float = 10.0, call_id: str = "", leg: int = 1) -> None:
        # call_id/leg: a browser back on a new peer connection after the worker holding its call died (leg 2+)
        self.info = CallInfo(
            call_id=call_id or f"webrtc-{secrets.token_hex(8)}", transport="webrtc", caller=caller,
            called="softphone", params=dict(params or {}), leg=leg,
        )
        servers = ice_servers() if servers is None else servers
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(**s) for s in servers]))
        self._init_queue()
        self._out: deque[np.ndarray | str] = deque()  # 160-sample frames and mark names, in order
        self._silence = np.zeros(FRAME_SAMPLES, np.int16)
        self._tasks: set[asyncio.Task[None]] = set()
        self.connect_timeout_s = connect_timeout_s
        # A browser sends audio frames without pause (silence too), but a closed tab or a lost network
        # may say nothing at all (no DTLS close, and aiortc runs no ICE consent checks): no inbound
        # audio this long once it has flowed ends the call like SIP's RTP timeout (outcome abandoned).
        self.media_timeout_s = media_timeout_s
        self.started_t = time.monotonic()  # reset when media starts flowing (greeting latency)
        self.connected = asyncio.Event()
        self.finished = asyncio.Event()  # set by end(): whoever waits for `connected` can stop waiting
        self.log = get_logger("telephony.webrtc", call_id=self.info.call_id)
        self._track = _BotTrack(self)

        self._reader: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._stereo_out = True  # Opus, what browsers pick; G.711/G.722 encoders are mono (see accept)
        self.end_reason: str | None = None  # why the call ended (CallEnded.reason), once it has
        self.dtmf_keys = 0  # keys delivered to the conversation
        self._dtmf_msgs = _Bucket(DTMF_RATE_PER_S, DTMF_BURST)
        self._dtmf_keys = _Bucket(DTMF_RATE_PER_S, DTMF_BURST)
        self._dtmf_limited_logged = False

        @self.pc.on("datachannel")
        def _on_datachannel(channel: Any) -> None:
            if channel.label != DTMF_CHANNEL:
                metrics.ERRORS.labels("webrtc", "bad_datachannel").inc()
                self.log.warning("webrtc_datachannel_refused", label=str(channel.label)[:40])
                channel.close()
                return

            @channel.on("message")
            def _on_message(msg: str | bytes) -> None:
                error = self.press(msg)
                if channel.readyState == "open":  # the page shows a refusal next to the keypad
                    channel.send(json.dumps({"error": error} if error else {"ok": True}))

        @self.pc.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            # one caller, one voice: only the first audio track is read (the others are answered
            # inactive in accept(), so nothing is sent on them)
            if track.kind == "audio" and self._reader is None:
                self._reader = self._spawn(self._read(track))

        @self.pc.on("connectionstatechange")
        async def _on_state() -> None:
            state = self.pc.connectionState
            self.log.info("webrtc_state", state=state)
            if state == "connected":
                self.started_t = time.monotonic()
                self.connected.set()
            elif state == "failed" and not self.connected.is_set():
                # ICE found no working candidate pair: the call never connected (the softphone records it)
                metrics.ERRORS.labels("webrtc", "ice_failed").inc()
                self.log.warning("webrtc_ice_failed", waited_s=round(time.monotonic() - self.started_t, 3))
                self.end("error:ice_failed")
            elif state == "closed" and self._closing is None:
                # not our close(): the peer closed its DTLS session (aiortc then closes the connection), a
                # hang-up. Chrome does so on close() when the call has a data channel (the keypad), often
                # before the RTCP BYE of its stopped microphone is read: the hang-up was recorded "disconnected".
                self.end("hangup")
            elif state in ("failed", "closed"):
                self.end("disconnected")

    # ---- signalling ----
    async def accept(self, sdp: str, sdp_type: str = "offer") -> RTCSessionDescription:
        """Apply the browser's offer and return our answer (ICE candidates included: no trickle)."""
        if sdp_type != "offer":
            self._reject("not_offer", f"expected an SDP offer, got {sdp_type!r}")
        if len(sdp) > MAX_OFFER_BYTES:
            self._reject("offer_too_large",
                         f"the offer is {len(sdp)} bytes; a browser's is a few KB (at most {MAX_OFFER_BYTES})")
        n_cand = sdp.count("a=candidate:")
        if n_cand > MAX_OFFER_CANDIDATES:
            self._reject("offer_too_large", f"the offer has {n_cand} ICE candidates (at most {MAX_OFFER_CANDIDATES})")
        if "m=audio" not in sdp:
            self._reject("no_audio", "the offer has no audio m-line")
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            audio = [t for t in self.pc.getTransceivers() if t.kind == "audio"]
            # the first audio section is the caller's microphone (addTrack below pairs our voice with it)
            if not audio:
                raise SignallingError("the offer has no audio m-line")
            # aiortc keeps the offer's direction from our side: recvonly = the caller only sends
            ours = getattr(audio[0], "_offerDirection", None) or "sendrecv"
            if ours not in ("sendrecv", "recvonly"):
                theirs = {"sendonly": "recvonly", "inactive": "inactive"}.get(ours, ours)
                raise SignallingError(f"the offer sends no audio (a={theirs}): the bot needs the caller's microphone")
            for t in self.pc.getTransceivers():
                if t is not audio[0]:
                    # video, a second microphone: answered inactive, so the browser sends nothing that
                    # aiortc would decode (video costs CPU) and queue unread for the whole call
                    t.direction = "inactive"
            self.pc.addTrack(self._track)
            await self.pc.setLocalDescription(await self.pc.createAnswer())
            codecs = getattr(audio[0], "_codecs", None)
            self._stereo_out = not codecs or codecs[0].mimeType.lower() == "audio/opus"
        except Exception as exc:  # noqa: BLE001 - aiortc raises assorted errors on bad SDP
            self._ended = True
            await self.pc.close()
            if isinstance(exc, SignallingError):
                self._reject("no_audio", str(exc))
            if "description send parameters" in str(exc):  # aiortc's words for "no codec in common"
                self._reject("no_common_codec", "could not use the SDP offer: no audio codec in common "
                             "(the bot takes Opus, G.722, PCMU or PCMA)")
            self.log.info("webrtc_offer_parse_error", error=repr(exc))
            self._reject("bad_offer", f"could not use the SDP offer: {str(exc) or 'malformed SDP'}")
        self._spawn(self._watchdog())
        return self.pc.localDescription

    def _reject(self, kind: str, message: str) -> NoReturn:
        """A refused offer: counted, logged with the call id, and no call (nothing was started yet,
        so there is no conversation and no call record to end)."""
        metrics.ERRORS.labels("webrtc", kind).inc()
        self.log.warning("webrtc_bad_offer", kind=kind, error=message[:300])
        self._ended = True
        self._track.stop()
        raise SignallingError(message)

    async def _watchdog(self) -> None:
        # ends early when the call ends some other way (closed, failed, hung up before connecting),
        # rather than lingering and then reporting a timeout for a call that is already over
        if not await wait_first((self.connected, self.finished), self.connect_timeout_s) and not self._ended:
            metrics.ERRORS.labels("webrtc", "connect_timeout").inc()
            self.log.warning("webrtc_connect_timeout", timeout_s=self.connect_timeout_s)
            self.end("error:connect_timeout")
            await self.close()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    # ---- inbound ----
    async def _read(self, track: MediaStreamTrack) -> None:
        down: Any = None
        rate = 0
        pending = np.zeros(0, np.int16)
        n_frames = 0
        reason = "hangup"
        started = False
        while not self._ended:
            try:
                frame = await asyncio.wait_for(track.recv(), self.media_timeout_s if started else None)
            except MediaStreamError:
                break
            except asyncio.TimeoutError:
                metrics.ERRORS.labels("webrtc", "media_timeout").inc()
                self.log.warning("webrtc_media_timeout", timeout_s=self.media_timeout_s)
                reason = "rtp_timeout"
                break
            started = True
            pcm = frame.to_ndarray()
            channels = len(frame.layout.channels)
            if frame.format.is_planar:
                pcm = pcm.astype(np.int32).mean(axis=0)
            else:
                pcm = pcm.reshape(-1, channels).astype(np.int32).mean(axis=1)
            pcm = pcm.astype(np.int16)
            if frame.sample_rate != rate:
                rate = frame.sample_rate
                down = _downsampler(rate)
            pending = np.concatenate([pending, down(pcm)])
            t = time.monotonic()
            k = len(pending) // FRAME_SAMPLES
            for i in range(k):
                self._inbox.put_nowait(AudioIn(pending[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES].copy(), t))
            pending = pending[k * FRAME_SAMPLES:]
            n_frames += k
            if n_frames >= 50:
                metrics.AUDIO_FRAMES.labels("webrtc", "in").inc(n_frames)
                n_frames = 0
        if n_frames:
            metrics.AUDIO_FRAMES.labels("webrtc", "in").inc(n_frames)
        self.end(reason)

    # ---- keypad (the console's data channel) ----
    def press(self, keys: Any) -> str | None:
        """Keys from the caller's keypad into the conversation, as DTMF digits. None when delivered,
        else why they were refused (nothing of a refused message is delivered)."""
        if not self._dtmf_msgs.take():
            return self._dtmf_refused("dtmf_rate_limited", "too many keys: at most "
                                      f"{DTMF_RATE_PER_S:g} a second", keys)
        if not isinstance(keys, str):
            return self._dtmf_refused("bad_dtmf", "keys must be text (0-9, * and #)", keys)
        if not keys or len(keys) > DTMF_MAX_KEYS:
            return self._dtmf_refused("bad_dtmf", f"send 1 to {DTMF_MAX_KEYS} keys at a time", keys)
        bad = sorted({c for c in keys if c not in DTMF_KEYS})
        if bad:
            return self._dtmf_refused("bad_dtmf", f"not a keypad key: {''.join(bad)[:8]!r} (only 0-9, * and #)", keys)
        if self._ended or not self.connected.is_set():
            return self._dtmf_refused("dtmf_not_connected", "the call is not connected", keys)
        if not self._dtmf_keys.take(len(keys)):
            return self._dtmf_refused("dtmf_rate_limited", "too many keys: at most "
                                      f"{DTMF_RATE_PER_S:g} a second", keys)
        t = time.monotonic()
        for k in keys:
            self._inbox.put_nowait(DtmfIn(k, t))
        self.dtmf_keys += len(keys)
        return None

    def _dtmf_refused(self, kind: str, message: str, keys: Any) -> str:
        metrics.ERRORS.labels("webrtc", kind).inc()
        if kind != "dtmf_rate_limited" or not self._dtmf_limited_logged:  # a flood logs once per call
            self._dtmf_limited_logged = self._dtmf_limited_logged or kind == "dtmf_rate_limited"
            self.log.warning("webrtc_dtmf_refused", kind=kind, error=message, keys=repr(keys)[:40])
        return message

    # ---- outbound (pulled by _BotTrack) ----
    def _next_out_frame(self) -> np.ndarray:
        frame: np.ndarray | None = None
        while self._out and frame is None:
            item = self._out.popleft()
            if isinstance(item, str):
                self._inbox.put_nowait(MarkIn(item, time.monotonic()))
            else:
                frame = item
        # marks right behind the last frame of an utterance are due as soon as it is out
        while self._out and isinstance(self._out[0], str):
            self._inbox.put_nowait(MarkIn(self._out.popleft(), time.monotonic()))  # type: ignore[arg-type]
        if frame is None:
            return self._silence
        metrics.AUDIO_FRAMES.labels("webrtc", "out").inc()
        return frame

    # ---- CallBridge ----
    def end(self, reason: str) -> None:
        if not self._ended:
            self.end_reason = reason
        super().end(reason)

    def _on_end(self) -> None:
        self._out.clear()
        self.finished.set()

    async def send_audio(self, pcm: np.ndarray) -> None:
        if self._ended or len(pcm) == 0:
            return
        pcm = np.asarray(pcm, dtype=np.int16)
        pad = (-len(pcm)) % FRAME_SAMPLES
        if pad:
            pcm = np.concatenate([pcm, np.zeros(pad, np.int16)])
        self._out.extend(pcm.reshape(-1, FRAME_SAMPLES))

    async def mark(self, name: str) -> None:
        if self._ended:
            return
        if not self._out:
            self._inbox.put_nowait(MarkIn(name, time.monotonic()))
        else:
            self._out.append(name)

    async def clear(self) -> None:
        # Like Twilio's `clear`: queued audio is dropped and pending marks come back at once.
        marks = [m for m in self._out if isinstance(m, str)]
        self._out.clear()
        now = time.monotonic()
        for m in marks:
            self._inbox.put_nowait(MarkIn(m, now))

    @property
    def can_transfer(self) -> bool:
        return False  # a browser softphone has no human queue behind it

    async def transfer(self, target: str, context: dict[str, Any]) -> bool:
        metrics.TRANSFERS.labels("webrtc", target, "unsupported").inc()
        self.log.info("transfer_unsupported", target=target)
        return False

    async def hangup(self, reason: str = "completed") -> None:
        self.end(f"bot:{reason}")
        await self.close()

    async def close(self) -> None:
        """End the call and close the peer connection (idempotent; safe to cancel)."""
        self.end("hangup")  # no-op when already ended; wakes the connect watchdog and the softphone runner
        self._track.stop()
        if self._reader is not None and self._reader is not asyncio.current_task():
            # aiortc ends the caller's track only if its receiver ever started: for a peer that never
            # connected, recv() waits forever, holding the reader task, this bridge and its peer connection
            self._reader.cancel()
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close_pc())
        # Shielded: hangup() runs in the conversation's turn task, which the conversation cancels as soon
        # as the CallEnded that end() queued reaches it. A pc.close() cancelled half-way never finishes
        # (and every later close() waits on it forever): the browser stayed "connected" with its
        # microphone live and the softphone runner never returned.
        await asyncio.shield(self._closing)

    async def _close_pc(self) -> None:
        try:
            await asyncio.wait_for(self.pc.close(), CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            metrics.ERRORS.labels("webrtc", "close_timeout").inc()
            self.log.warning("webrtc_close_timeout", timeout_s=CLOSE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a transport that failed may fail to stop too
            self.log.info("webrtc_close_error", error=repr(exc))
