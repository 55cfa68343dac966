"""The transport-neutral face of a live call, shared by the Twilio, SIP and WebRTC bridges.

Inbound: 20 ms frames of 8 kHz int16 PCM (160 samples), DTMF digits, marks (audio the caller has
actually heard), and the end of the call. Outbound: audio, clear (barge-in), transfer, hangup.
"""

from __future__ import annotations

import abc
import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Union

import numpy as np

FRAME_SAMPLES = 160  # 20 ms at 8 kHz
FRAME_BYTES = FRAME_SAMPLES * 2


@dataclass(frozen=True)
class AudioIn:
    pcm: np.ndarray  # int16, FRAME_SAMPLES long
    t: float  # monotonic arrival time


@dataclass(frozen=True)
class DtmfIn:
    digit: str
    t: float


@dataclass(frozen=True)
class MarkIn:
    """The caller's side has played out everything sent before the mark named `name`."""

    name: str
    t: float


@dataclass(frozen=True)
class CallEnded:
    reason: str  # hangup | stream_stopped | disconnected | rtp_timeout | error:<kind>
    t: float


InboundEvent = Union[AudioIn, DtmfIn, MarkIn, CallEnded]


async def until_ended(inbox: "asyncio.Queue[InboundEvent]") -> AsyncIterator[InboundEvent]:
    """A bridge's queued inbound events, up to and including CallEnded (every bridge's events())."""
    while True:
        ev = await inbox.get()
        yield ev
        if isinstance(ev, CallEnded):
            return


@dataclass
class CallInfo:
    call_id: str
    transport: str  # twilio | sip | webrtc
    caller: str = ""  # raw number; mask before logging
    called: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    # 2+: the same call back on a new stream after its previous one was lost (Twilio <Connect action>): the
    # conversation resumes in the call's record instead of starting a new one
    leg: int = 1
    # the call id whose conversation this leg takes over (SIP INVITE with Replaces: attended transfer, pickup)
    resumes: str = ""


class CallBridge(abc.ABC):
    """One live call on one transport."""

    info: CallInfo
    # the caller was answered (TwiML served) before this worker began draining and the stream came late: the
    # drain runs the call (within its grace) rather than hang up on a caller who hears nothing yet
    answered_before_drain: bool = False

    @abc.abstractmethod
    def events(self) -> AsyncIterator[InboundEvent]:
        """Inbound events until (and including) CallEnded."""

    @abc.abstractmethod
    async def send_audio(self, pcm: np.ndarray) -> None:
        """Queue 8 kHz int16 audio for the caller; the bridge paces it in 20 ms frames."""

    @abc.abstractmethod
    async def mark(self, name: str) -> None:
        """Ask to be told (MarkIn) when the caller has heard everything queued so far."""

    @abc.abstractmethod
    async def clear(self) -> None:
        """Barge-in: drop queued bot audio now."""

    @abc.abstractmethod
    async def transfer(self, target: str, context: dict[str, Any]) -> bool:
        """Hand the caller to a human target (queue name / SIP URI / number). True on success."""

    @abc.abstractmethod
    async def hangup(self, reason: str = "completed") -> None:
        """End the call from the bot's side."""

    async def hangup_unshared(self, reason: str = "completed") -> None:
        """End the call from the bot's side when that end could not be recorded where every worker reads it
        (Redis down or slow). The same as hangup() for transports whose end does not depend on it."""
        await self.hangup(reason)

    def media_quality(self) -> dict[str, float | int] | None:
        """The call's audio quality as the transport measured it (SIP: RTP loss and jitter both ways, from RTCP),
        for the call's story; None where the transport measures none (Twilio Media Streams carry no such stats)."""
        return None

    @property
    def can_transfer(self) -> bool:
        """Whether transfer() can move this call at all (Twilio without REST credentials, a browser softphone:
        no). A caller is not told "I'm transferring you" on a line that cannot be transferred."""
        return True

    @property
    def on_hold(self) -> bool:
        """The caller put the call on hold (SIP re-INVITE sendonly/inactive): nothing we send is heard, and
        silence from the caller is expected. Transports without hold say False."""
        return False


class QueuedCallBridge(CallBridge):
    """A bridge whose transport pushes inbound events into one queue (Twilio, WebRTC): the end-of-call
    bookkeeping they share. Subclasses call _init_queue() and may extend _on_end()."""

    def _init_queue(self) -> None:
        self._inbox: asyncio.Queue[InboundEvent] = asyncio.Queue()
        self._ended = False

    def end(self, reason: str) -> None:
        """The call is over (hangup, disconnect, fatal error): CallEnded is the last inbound event."""
        if not self._ended:
            self._ended = True
            self._on_end()
            self._inbox.put_nowait(CallEnded(reason, time.monotonic()))

    def _on_end(self) -> None:
        """Drop what is still queued for the caller."""

    @property
    def ended(self) -> bool:
        return self._ended

    def events(self) -> AsyncIterator[InboundEvent]:
        return until_ended(self._inbox)
