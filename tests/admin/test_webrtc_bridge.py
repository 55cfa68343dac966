"""telephony/webrtc.py against a real aiortc peer (Opus over DTLS-SRTP on loopback): 48 kHz in ->
8 kHz 20 ms frames; 8 kHz bot audio out -> 48 kHz at the peer, paced; marks, clear, hangup, bad SDP."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

from telephony.bridge import FRAME_SAMPLES, AudioIn, CallEnded, MarkIn
from telephony.webrtc import SignallingError, WebRTCCallBridge, ice_servers
from tests.helpers.webrtc_tone import Tone


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x.astype(np.float32) * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spec))])


async def test_audio_both_ways_with_resampling_and_marks() -> None:
    peer = RTCPeerConnection()
    peer.addTrack(Tone(1000.0))
    received: list[np.ndarray] = []
    got_track = asyncio.Event()

    @peer.on("track")
    def _on_track(track: MediaStreamTrack) -> None:
        async def read() -> None:
            while True:
                try:
                    f = await track.recv()
                except MediaStreamError:
                    return
                arr = f.to_ndarray().reshape(-1, len(f.layout.channels))[:, 0]
                assert f.sample_rate == 48000
                received.append(arr.copy())
        asyncio.get_running_loop().create_task(read())
        got_track.set()

    await peer.setLocalDescription(await peer.createOffer())
    bridge = WebRTCCallBridge(caller="test")
    answer = await bridge.accept(peer.localDescription.sdp, "offer")
    await peer.setRemoteDescription(RTCSessionDescription(answer.sdp, answer.type))
    await asyncio.wait_for(bridge.connected.wait(), 15)
    assert bridge.info.transport == "webrtc" and bridge.info.call_id.startswith("webrtc-")

    # inbound: the peer's 1 kHz tone arrives as 8 kHz, 160-sample frames
    frames: list[np.ndarray] = []
    events = bridge.events()
    async def collect_inbound(n: int) -> None:
        async for ev in events:
            if isinstance(ev, AudioIn):
                assert ev.pcm.dtype == np.int16 and len(ev.pcm) == FRAME_SAMPLES
                frames.append(ev.pcm)
                if len(frames) >= n:
                    return
    await asyncio.wait_for(collect_inbound(100), 20)
    pcm8 = np.concatenate(frames[-50:])
    assert abs(dominant_hz(pcm8, 8000) - 1000) < 30

    # outbound: 1 s of 440 Hz at 8 kHz plays at the peer at 48 kHz, then the mark comes back
    await asyncio.wait_for(got_track.wait(), 10)
    received.clear()
    t = np.arange(8000) / 8000
    t_send = time.monotonic()
    await bridge.send_audio((10000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16))
    await bridge.mark("end-of-tone")
    mark_t = None
    async def wait_mark() -> None:
        nonlocal mark_t
        async for ev in events:
            if isinstance(ev, MarkIn) and ev.name == "end-of-tone":
                mark_t = time.monotonic()
                return
    await asyncio.wait_for(wait_mark(), 10)
    assert mark_t is not None and mark_t - t_send >= 0.9  # paced in real time, not dumped at once
    await asyncio.sleep(1.5)  # the peer's jitter buffer holds a little
    out = np.concatenate(received)
    loud = np.abs(out) > 1000
    print("received", len(out), "loud", int(loud.sum()))
    assert loud.sum() > 0.8 * 48000 * 0.9
    start = int(np.argmax(np.abs(out) > 1000))
    assert abs(dominant_hz(out[start:start + 24000], 48000) - 440) < 15

    # clear drops queued audio and returns its pending marks at once
    await bridge.send_audio(np.zeros(8000 * 5, np.int16))
    await bridge.mark("never-played")
    t_clear = time.monotonic()
    await bridge.clear()
    async def wait_cleared() -> float:
        async for ev in events:
            if isinstance(ev, MarkIn) and ev.name == "never-played":
                return time.monotonic()
        return 0.0
    assert (await asyncio.wait_for(wait_cleared(), 5)) - t_clear < 0.5
    assert not await bridge.transfer("general", {})

    # the bot hangs up: CallEnded is the last event
    await bridge.hangup("completed")
    async def last() -> CallEnded:
        async for ev in events:
            if isinstance(ev, CallEnded):
                return ev
        raise AssertionError("no CallEnded")
    assert (await asyncio.wait_for(last(), 5)).reason == "bot:completed"
    await peer.close()


class GoesSilent(Tone):
    """A browser tab that is closed (or loses its network) mid-call: frames stop, and no DTLS close
    or BYE follows."""

    def __init__(self, hz: float, frames: int) -> None:
        super().__init__(hz)
        self.frames = frames

    async def recv(self) -> AudioFrame:
        if self.n >= self.frames * 960:
            await asyncio.Event().wait()  # never another frame
        return await super().recv()


async def test_peer_that_goes_silent_ends_the_call() -> None:
    """Closing the console tab left the bot talking to nobody until its no-input prompts ran out
    (outcome no_input, ~20 s). Inbound media stopping now ends the call as an RTP timeout."""
    peer = RTCPeerConnection()
    peer.addTrack(GoesSilent(1000.0, frames=50))
    await peer.setLocalDescription(await peer.createOffer())
    bridge = WebRTCCallBridge(caller="test", media_timeout_s=1.0)
    answer = await bridge.accept(peer.localDescription.sdp, "offer")
    await peer.setRemoteDescription(RTCSessionDescription(answer.sdp, answer.type))
    await asyncio.wait_for(bridge.connected.wait(), 15)
    got_audio = False
    t_end = None

    async def until_end() -> CallEnded:
        nonlocal got_audio, t_end
        async for ev in bridge.events():
            if isinstance(ev, AudioIn):
                got_audio = True
            if isinstance(ev, CallEnded):
                t_end = time.monotonic()
                return ev
        raise AssertionError("no CallEnded")

    t0 = time.monotonic()
    ended = await asyncio.wait_for(until_end(), 10)
    assert got_audio and ended.reason == "rtp_timeout"
    assert t_end is not None and t_end - t0 < 5
    await bridge.close()
    await peer.close()


async def test_bad_offers_are_clear_errors() -> None:
    with pytest.raises(SignallingError, match="no audio"):
        await WebRTCCallBridge().accept("v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n", "offer")
    with pytest.raises(SignallingError, match="expected an SDP offer"):
        await WebRTCCallBridge().accept("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "answer")
    with pytest.raises(SignallingError, match="could not use"):
        await WebRTCCallBridge().accept("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nthis is not sdp\r\n", "offer")


async def test_ice_servers_config() -> None:
    assert ice_servers("") == [] and ice_servers("  ") == []  # default: host candidates only
    turn = '[{"urls": ["turn:t.example.org:3478?transport=tcp"], "username": "u", "credential": "p", "x": 1}]'
    assert ice_servers(turn) == [{"urls": ["turn:t.example.org:3478?transport=tcp"], "username": "u", "credential": "p"}]
    for bad in ("{", '{"urls": "stun:a"}', "[{}]", '[{"urls": "https://a"}]', '[{"urls": [1]}]', "[1]"):
        with pytest.raises(ValueError, match="BOT_WEBRTC_ICE_SERVERS"):
            ice_servers(bad)
    # aiortc accepts what we pass (it would otherwise fall back to a public Google STUN server)
    bridge = WebRTCCallBridge(servers=ice_servers(turn))
    bridge.pc.addTransceiver("audio")
    await bridge.pc.close()
