"""telephony/webrtc.py against hostile and unusual peers (real aiortc peers on loopback): offers a browser
would never send are refused before aiortc spends the event loop on them, extra media sections are
answered inactive, a peer that leaves ends the call as a caller hang-up, audio keeps its level both
ways, and a run of calls leaves no peer connections, tasks or sockets behind."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import threading

import numpy as np
import pytest
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError

from ops import metrics
from telephony.bridge import AudioIn, CallEnded, MarkIn
from telephony.webrtc import MAX_OFFER_BYTES, MAX_OFFER_CANDIDATES, SignallingError, WebRTCCallBridge
from tests.helpers.webrtc_tone import Tone


def errors(kind: str) -> float:
    return metrics.ERRORS.labels("webrtc", kind)._value.get()


async def browser_offer(*kinds: str) -> RTCPeerConnection:
    """An offering peer: 'audio' = a microphone (1 kHz), 'audio2' = a second one (3 kHz), 'video' = a camera,
    'recvonly' = an audio section that only listens."""
    pc = RTCPeerConnection()
    for k in kinds:
        if k == "audio":
            pc.addTrack(Tone(1000.0))
        elif k == "audio2":
            pc.addTransceiver(Tone(3000.0), direction="sendrecv")
        elif k == "video":
            pc.addTrack(VideoStreamTrack())
        elif k == "recvonly":
            pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc


def sections(sdp: str) -> list[tuple[str, str]]:
    """(kind, direction) of each m-line of an SDP."""
    out = []
    for block in re.split(r"\r\n(?=m=)", sdp)[1:]:
        kind = block[2:].split(" ", 1)[0]
        d = next((x for x in ("sendrecv", "sendonly", "recvonly", "inactive") if f"a={x}" in block), "sendrecv")
        out.append((kind, d))
    return out


async def test_offers_no_browser_sends_are_refused_before_aiortc() -> None:
    """An editor's script (or a broken client) posting a 1 MB offer or thousands of ICE candidates used to
    stall the whole worker: aiortc pairs candidates on the event loop in quadratic time (2,000 took
    seconds, 20,000 never finished), freezing every live call's audio. Such offers are refused up front."""
    peer = await browser_offer("audio")
    sdp = peer.localDescription.sdp
    await peer.close()
    many = sdp + "".join(f"a=candidate:{i} 1 udp 2130706431 10.0.{i // 256}.{i % 256} {2000 + i} typ host\r\n"
                         for i in range(MAX_OFFER_CANDIDATES + 1))
    before = errors("offer_too_large")
    for bad, match in ((many, "ICE candidates"), (sdp + "a=x-pad:" + "x" * MAX_OFFER_BYTES + "\r\n", "bytes")):
        bridge = WebRTCCallBridge(connect_timeout_s=2)
        with pytest.raises(SignallingError, match=match):
            await bridge.accept(bad, "offer")
        assert bridge.pc.remoteDescription is None  # aiortc never saw it
        assert bridge.ended
        await bridge.close()
    assert errors("offer_too_large") == before + 2

    # a real browser offer with a normal handful of candidates is still fine
    bridge = WebRTCCallBridge(connect_timeout_s=2)
    answer = await bridge.accept(sdp, "offer")
    assert sections(answer.sdp) == [("audio", "sendrecv")]
    await bridge.close()


async def test_offers_the_bot_cannot_use_are_clear_errors() -> None:
    peer = await browser_offer("audio")
    sdp = peer.localDescription.sdp
    await peer.close()

    # an offer that only listens: the bot would talk to a caller it can never hear, until no-input ends it
    listener = await browser_offer("recvonly")
    before = errors("no_audio")
    bridge = WebRTCCallBridge(connect_timeout_s=2)
    with pytest.raises(SignallingError, match="sends no audio.*microphone"):
        await bridge.accept(listener.localDescription.sdp, "offer")
    await listener.close()
    assert errors("no_audio") == before + 1

    # no codec in common: said as such, not as aiortc's "send parameters" internals
    foo = re.sub(r"(m=audio \d+ \S+) [\d ]+", r"\1 99", sdp)
    foo = "\r\n".join(x for x in foo.split("\r\n") if not x.startswith(("a=rtpmap", "a=fmtp", "a=rtcp-fb")))
    foo = foo.replace("a=mid:0", "a=mid:0\r\na=rtpmap:99 FOO/8000")
    before = errors("no_common_codec")
    with pytest.raises(SignallingError, match="no audio codec in common"):
        await WebRTCCallBridge(connect_timeout_s=2).accept(foo, "offer")
    assert errors("no_common_codec") == before + 1

    # garbage: aiortc's parser fails with an empty AssertionError; the message still says what happened
    before = errors("bad_offer")
    with pytest.raises(SignallingError, match="could not use the SDP offer: malformed SDP"):
        await WebRTCCallBridge(connect_timeout_s=2).accept("m=audio\x00\xff" * 10, "offer")
    assert errors("bad_offer") == before + 1


async def test_video_and_a_second_microphone_are_answered_inactive() -> None:
    """A camera or a second audio section used to be answered recvonly: the browser then sent video that
    aiortc decoded (CPU) into a queue nobody read (memory) for the whole call, and a second microphone was
    read into the same inbox, two voices interleaved frame by frame."""
    peer = await browser_offer("audio", "video", "audio2")
    bridge = WebRTCCallBridge(caller="test")
    answer = await bridge.accept(peer.localDescription.sdp, "offer")
    assert sections(answer.sdp) == [("audio", "sendrecv"), ("video", "inactive"), ("audio", "inactive")]
    await peer.setRemoteDescription(RTCSessionDescription(answer.sdp, answer.type))
    await asyncio.wait_for(bridge.connected.wait(), 15)

    frames: list[np.ndarray] = []

    async def collect(n: int) -> None:
        async for ev in bridge.events():
            if isinstance(ev, AudioIn):
                frames.append(ev.pcm)
                if len(frames) >= n:
                    return

    await asyncio.wait_for(collect(100), 20)
    pcm = np.concatenate(frames[-50:]).astype(np.float64)
    spec = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    freqs = np.fft.rfftfreq(len(pcm), 1 / 8000)
    at = lambda hz: spec[(freqs > hz - 50) & (freqs < hz + 50)].max()  # noqa: E731
    assert at(3000) < 0.01 * at(1000)  # only the first microphone is heard
    await bridge.hangup("completed")
    await bridge.close()
    await peer.close()


class Recorder:
    """Reads a remote track into a list (the browser's speaker)."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.task: asyncio.Task[None] | None = None

    def attach(self, track: MediaStreamTrack) -> None:
        async def read() -> None:
            while True:
                try:
                    f = await track.recv()
                except MediaStreamError:
                    return
                self.chunks.append(f.to_ndarray().reshape(-1, len(f.layout.channels))[:, 0].copy())

        self.task = asyncio.get_running_loop().create_task(read())


def rms_db(x: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-9)


async def test_levels_survive_both_ways_and_peer_hangup_is_a_caller_hangup() -> None:
    """48 kHz Opus -> 8 kHz and back keep the level: a caller at -12 dBFS reaches the engine within a few
    dB of it, and the bot's prompts reach the browser as loud as they were rendered."""
    peer = await browser_offer("audio")
    rec = Recorder()
    peer.on("track", rec.attach)
    bridge = WebRTCCallBridge(caller="test")
    answer = await bridge.accept(peer.localDescription.sdp, "offer")
    await peer.setRemoteDescription(RTCSessionDescription(answer.sdp, answer.type))
    await asyncio.wait_for(bridge.connected.wait(), 15)
    events = bridge.events()

    frames: list[np.ndarray] = []

    async def inbound(n: int) -> None:
        async for ev in events:
            if isinstance(ev, AudioIn):
                frames.append(ev.pcm)
                if len(frames) >= n:
                    return

    await asyncio.wait_for(inbound(100), 20)
    sent_db = rms_db((8000 * np.sin(2 * np.pi * 1000 * np.arange(48000) / 48000)).astype(np.int16))
    got_db = rms_db(np.concatenate(frames[-50:]))
    assert abs(got_db - sent_db) < 3, (got_db, sent_db)

    # outbound: 1 s of 440 Hz at 8 kHz, then a mark once it has gone out
    tone = (10000 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.int16)
    rec.chunks.clear()
    await bridge.send_audio(tone)
    await bridge.mark("tone-done")

    async def mark() -> None:
        async for ev in events:
            if isinstance(ev, MarkIn) and ev.name == "tone-done":
                return

    await asyncio.wait_for(mark(), 10)
    await asyncio.sleep(1.0)  # the peer's jitter buffer
    out = np.concatenate(rec.chunks)
    loud = np.flatnonzero(np.abs(out) > 2000)
    assert len(loud) > 0
    body = out[loud[0] + 4800: loud[0] + 4800 + 24000]  # 0.5 s inside the tone, past Opus's ramp-up
    assert abs(rms_db(body) - rms_db(tone)) < 3, (rms_db(body), rms_db(tone))

    # the browser hangs up (closes its peer connection): the call ends as the caller's hang-up
    await peer.close()

    async def ended() -> CallEnded:
        async for ev in events:
            if isinstance(ev, CallEnded):
                return ev
        raise AssertionError("no CallEnded")

    assert (await asyncio.wait_for(ended(), 15)).reason == "hangup"  # a BYE or a DTLS close: both a hang-up
    await bridge.close()


async def test_close_before_connect_is_not_a_connect_timeout() -> None:
    """A call closed before it connected (bad answer on the browser side, the admin hanging up while
    connecting) kept its connect watchdog for 20 s, which then logged and counted a connect timeout
    for a call that had already ended; the softphone runner waited those 20 s as well."""
    peer = await browser_offer("audio")
    bridge = WebRTCCallBridge(caller="test", connect_timeout_s=0.5)
    await bridge.accept(peer.localDescription.sdp, "offer")
    await peer.close()  # never given the answer: nothing will connect
    before = errors("connect_timeout")
    await bridge.close()
    assert bridge.finished.is_set() and bridge.ended
    await asyncio.sleep(1.5)
    assert not bridge._tasks, [t.get_coro() for t in bridge._tasks]
    assert errors("connect_timeout") == before

    # one that is left alone does time out, once, with its own reason
    peer = await browser_offer("audio")
    bridge = WebRTCCallBridge(caller="test", connect_timeout_s=0.5)
    await bridge.accept(peer.localDescription.sdp, "offer")
    await peer.close()

    async def reason() -> str:
        async for ev in bridge.events():
            if isinstance(ev, CallEnded):
                return ev.reason
        return ""

    assert await asyncio.wait_for(reason(), 10) == "error:connect_timeout"
    assert errors("connect_timeout") == before + 1
    await bridge.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_many_calls_leak_nothing() -> None:
    """After a run of calls (connect, talk, either side hangs up) no peer connection, task, thread or socket
    is left behind by the bridge."""

    async def one_call(i: int) -> None:
        peer = await browser_offer("audio")
        rec = Recorder()
        peer.on("track", rec.attach)
        bridge = WebRTCCallBridge(caller="test")
        answer = await bridge.accept(peer.localDescription.sdp, "offer")
        await peer.setRemoteDescription(RTCSessionDescription(answer.sdp, answer.type))
        await asyncio.wait_for(bridge.connected.wait(), 15)
        await bridge.send_audio(np.zeros(1600, np.int16))
        n = 0
        async for ev in bridge.events():
            if isinstance(ev, AudioIn):
                n += 1
                if n == 10:
                    if i % 2:
                        await bridge.hangup("completed")
                    else:
                        await peer.close()
            if isinstance(ev, CallEnded):
                break
        await bridge.close()
        await peer.close()
        if rec.task is not None:
            await asyncio.wait_for(rec.task, 5)

    await one_call(0)  # warm-up: aiortc's and PyAV's lazily created state
    await asyncio.sleep(0.5)
    gc.collect()
    fds0, threads0 = _open_fds(), threading.active_count()
    for i in range(6):
        await asyncio.wait_for(one_call(i), 40)
    for _ in range(50):  # aiortc's transports finish closing a moment later
        await asyncio.sleep(0.1)
        gc.collect()
        live = [o for o in gc.get_objects() if isinstance(o, (RTCPeerConnection, WebRTCCallBridge))]
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if not live and not tasks and _open_fds() <= fds0:
            break
    assert not live, f"{len(live)} peer connections / bridges still alive"
    assert not tasks, [t.get_coro() for t in tasks]
    assert _open_fds() <= fds0 + 2, (fds0, _open_fds())
    assert threading.active_count() <= threads0 + 1


async def test_bot_hangup_closes_the_peer_connection_even_when_its_task_is_cancelled() -> None:
    """The conversation hangs up from its turn task and cancels that task as soon as the CallEnded that
    hangup() queued reaches it. aiortc's close() was cancelled half-way: the bot's peer connection never
    closed (the softphone runner then waited on it forever) and the browser stayed "connected", its
    microphone live, after the bot had said goodbye."""
    peer = await browser_offer("audio")
    bridge = WebRTCCallBridge(caller="test")
    answer = await bridge.accept(peer.localDescription.sdp, "offer")
    await peer.setRemoteDescription(RTCSessionDescription(answer.sdp, answer.type))
    await asyncio.wait_for(bridge.connected.wait(), 15)
    await bridge.send_audio(np.zeros(4000, np.int16))
    events = bridge.events()
    hangup = asyncio.get_running_loop().create_task(bridge.hangup("completed"))
    async for ev in events:
        if isinstance(ev, CallEnded):
            break
    hangup.cancel()  # what Conversation does with its turn task
    await asyncio.wait_for(bridge.close(), 10)  # the softphone runner's `finally`
    assert bridge.pc.connectionState == "closed"
    for _ in range(100):  # the browser hears the DTLS close
        if peer.connectionState == "closed":
            break
        await asyncio.sleep(0.1)
    assert peer.connectionState == "closed"
    await peer.close()
