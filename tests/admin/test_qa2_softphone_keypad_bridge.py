"""The softphone keypad and never-connected calls at the bridge (telephony/webrtc.py), with a real aiortc
peer on loopback playing the browser: keys sent on the "dtmf" data channel reach the call's inbound events
as DtmfIn (like RFC 4733 digits on SIP), bad keys and floods are refused on the channel, counted and
logged, and a call whose ICE never completes ends as error:connect_timeout with the reason kept."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription

from ops import metrics
from telephony.bridge import DtmfIn
from telephony.webrtc import DTMF_BURST, DTMF_MAX_KEYS, WebRTCCallBridge
from tests.helpers.webrtc_tone import Tone


def errors(kind: str) -> float:
    return metrics.ERRORS.labels("webrtc", kind)._value.get()


async def connected_pair(label: str = "dtmf") -> tuple[RTCPeerConnection, Any, WebRTCCallBridge, asyncio.Queue]:
    """A browser-like peer (microphone + keypad channel) connected to a bridge; replies land in the queue."""
    peer = RTCPeerConnection()
    peer.addTrack(Tone(1000.0))
    channel = peer.createDataChannel(label)
    replies: asyncio.Queue = asyncio.Queue()
    opened = asyncio.Event()
    channel.on("open", opened.set)
    channel.on("message", lambda m: replies.put_nowait(json.loads(m)))
    await peer.setLocalDescription(await peer.createOffer())
    bridge = WebRTCCallBridge(caller="softphone:test")
    answer = await bridge.accept(peer.localDescription.sdp, "offer")
    await peer.setRemoteDescription(RTCSessionDescription(answer.sdp, answer.type))
    await asyncio.wait_for(bridge.connected.wait(), 20)
    if label == "dtmf":
        await asyncio.wait_for(opened.wait(), 20)
    return peer, channel, bridge, replies


def digits(bridge: WebRTCCallBridge) -> str:
    """The DTMF digits queued for the conversation so far (audio frames are skipped)."""
    out = []
    while not bridge._inbox.empty():
        ev = bridge._inbox.get_nowait()
        if isinstance(ev, DtmfIn):
            out.append(ev.digit)
    return "".join(out)


async def test_keys_on_the_data_channel_become_dtmf_and_bad_keys_are_refused() -> None:
    peer, channel, bridge, replies = await connected_pair()
    try:
        channel.send("0")
        assert await asyncio.wait_for(replies.get(), 10) == {"ok": True}
        channel.send("50#")  # a typed amount
        assert await asyncio.wait_for(replies.get(), 10) == {"ok": True}
        assert digits(bridge) == "050#"
        assert bridge.dtmf_keys == 4

        bad0, big0 = errors("bad_dtmf"), errors("bad_dtmf")
        for bad, said in (("A", "not a keypad key"), ("5x", "not a keypad key"), ("１", "not a keypad key"),
                          ("1" * (DTMF_MAX_KEYS + 1), f"1 to {DTMF_MAX_KEYS} keys"), (b"\x01", "must be text")):
            channel.send(bad)
            reply = await asyncio.wait_for(replies.get(), 10)
            assert said in reply.get("error", ""), (bad, reply)
        assert errors("bad_dtmf") == bad0 + 5 and big0 == bad0
        assert digits(bridge) == ""  # nothing of a refused message reached the conversation ("5x": not the 5)
        assert not bridge.ended  # bad input never ends the call

        await asyncio.sleep(DTMF_MAX_KEYS / 10 + 0.5)  # the key bucket refills: the longest message goes through
        channel.send("1" * DTMF_MAX_KEYS)
        assert await asyncio.wait_for(replies.get(), 10) == {"ok": True}
        assert digits(bridge) == "1" * DTMF_MAX_KEYS
    finally:
        await bridge.close()
        await peer.close()


async def test_a_flood_of_keys_is_rate_limited() -> None:
    peer, channel, bridge, replies = await connected_pair()
    try:
        before = errors("dtmf_rate_limited")
        n = int(DTMF_BURST) * 3
        for _ in range(n):
            channel.send("1")
        got = [await asyncio.wait_for(replies.get(), 10) for _ in range(n)]
        refused = [r for r in got if "too many keys" in r.get("error", "")]
        delivered = digits(bridge)
        assert refused and len(delivered) + len(refused) == n
        assert len(delivered) < n and delivered == "1" * len(delivered)
        assert errors("dtmf_rate_limited") == before + len(refused)
        # the bucket refills: a person's next key a moment later goes through
        await asyncio.sleep(0.5)
        channel.send("2")
        assert await asyncio.wait_for(replies.get(), 10) == {"ok": True}
        assert digits(bridge) == "2"
    finally:
        await bridge.close()
        await peer.close()


async def test_other_data_channels_are_refused() -> None:
    before = errors("bad_datachannel")
    peer, channel, bridge, _ = await connected_pair(label="chat")
    try:
        for _ in range(100):
            if errors("bad_datachannel") == before + 1:
                break
            await asyncio.sleep(0.1)
        assert errors("bad_datachannel") == before + 1
        assert not bridge.ended
    finally:
        await bridge.close()
        await peer.close()


async def test_keys_before_the_call_connects_are_refused() -> None:
    peer = RTCPeerConnection()
    peer.addTrack(Tone(1000.0))
    await peer.setLocalDescription(await peer.createOffer())
    bridge = WebRTCCallBridge(caller="softphone:test", connect_timeout_s=30)
    await bridge.accept(peer.localDescription.sdp, "offer")
    before = errors("dtmf_not_connected")
    assert "not connected" in (bridge.press("1") or "")
    assert errors("dtmf_not_connected") == before + 1
    await bridge.close()
    await peer.close()


async def test_a_peer_that_never_connects_ends_as_connect_timeout() -> None:
    """The browser's offer is answered but its ICE never completes (it never applies the answer: a firewall,
    a NAT without TURN). The bridge ends the call with the reason the softphone records as its outcome."""
    peer = RTCPeerConnection()
    peer.addTrack(Tone(1000.0))
    peer.createDataChannel("dtmf")
    await peer.setLocalDescription(await peer.createOffer())
    bridge = WebRTCCallBridge(caller="softphone:test", connect_timeout_s=1.5)
    before = errors("connect_timeout")
    await bridge.accept(peer.localDescription.sdp, "offer")
    await asyncio.wait_for(bridge.finished.wait(), 20)
    assert not bridge.connected.is_set()
    assert bridge.end_reason == "error:connect_timeout"
    assert errors("connect_timeout") == before + 1
    await bridge.close()
    await peer.close()


async def test_a_peer_with_a_keypad_channel_hanging_up_is_a_caller_hangup() -> None:
    """A peer that closes its peer connection sends a DTLS close (and, with a data channel, an SCTP abort):
    aiortc then closes the connection ("closed"), which was read as "disconnected" whenever it came before the
    stopped microphone's RTCP BYE, so the console's Hang up was often recorded as outcome disconnected. (An
    aiortc peer sends its BYE first, so the race itself shows with Chrome: test_qa_webrtc_softphone_browser's
    hang-up tests; this one pins the outcome for a peer that leaves.)"""
    peer, _, bridge, _ = await connected_pair()
    await peer.close()
    await asyncio.wait_for(bridge.finished.wait(), 15)
    assert bridge.end_reason == "hangup"
    await bridge.close()
