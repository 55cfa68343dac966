"""TwiML documents, built with the twilio library's classes (escaping handled there)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from twilio.twiml.voice_response import Connect, VoiceResponse

_DIALABLE = re.compile(r"^(\+?\d{3,15}|sips?:.+)$")
# Twilio's own voice reads these; the bot's voice is gone once the call has left the stream
STREAM_LOST_TEXT = "I'm sorry, we're having technical difficulties. Please call back later. Goodbye."
TRANSFER_UNANSWERED_TEXT = "I'm sorry, nobody is available to take your call right now. Please call back later. Goodbye."


@dataclass(frozen=True)
class DialOptions:
    """How a transfer dials or enqueues. `action_url` (absolute) is where Twilio posts the outcome when the
    <Dial>/<Enqueue> ends, so a caller whose agent never answers hears an apology instead of dead air."""

    action_url: str = ""
    caller_id: str = ""  # <Dial callerId>: empty keeps Twilio's default (the caller's number)
    timeout_s: int = 0  # <Dial timeout> (ringing time, 5-600 s); 0 keeps Twilio's default of 30 s


def connect_stream(stream_url: str, params: dict[str, str], action_url: str = "") -> str:
    """<Connect><Stream>: a bidirectional stream. Nothing follows <Connect>: without `action_url` the call ends
    when the socket closes; with it, Twilio asks that URL what to do next (telephony/twilio/server.py: hang up
    after the bot's own end, a new stream when the stream was lost with the caller still on the line)."""
    resp = VoiceResponse()
    connect = Connect(action=action_url, method="POST") if action_url else Connect()
    stream = connect.stream(url=stream_url)
    for name, value in params.items():
        if value:
            stream.parameter(name=name, value=value)
    resp.append(connect)
    return str(resp)


def transfer(target: str, opts: DialOptions | None = None, say: str = "") -> str:
    """A number or SIP URI is dialed; anything else is a TaskRouter/queue name to enqueue. `say`: announced
    first in Twilio's voice (when the bot's own voice is gone with its stream)."""
    target = target.strip()
    if not target:
        raise ValueError("empty transfer target")
    opts = opts or DialOptions()
    action = {"action": opts.action_url, "method": "POST"} if opts.action_url else {}
    resp = VoiceResponse()
    if say:
        resp.say(say)
    if _DIALABLE.match(target):
        dial_kw: dict[str, object] = dict(action)
        if opts.caller_id:
            dial_kw["caller_id"] = opts.caller_id
        if opts.timeout_s:
            dial_kw["timeout"] = max(5, min(600, int(opts.timeout_s)))
        if target.startswith("sip"):
            dial = resp.dial(**dial_kw)
            dial.sip(target)
        else:
            resp.dial(target, **dial_kw)
    else:
        resp.enqueue(target, **action)
    return str(resp)


def transfer_outcome(apologize: bool) -> str:
    """The answer to a transfer's action callback: after a conversation with an agent, end the call; after
    no agent (no answer, busy, queue full, error), apologize first."""
    resp = VoiceResponse()
    if apologize:
        resp.say(TRANSFER_UNANSWERED_TEXT)
    resp.hangup()
    return str(resp)


def hangup() -> str:
    resp = VoiceResponse()
    resp.hangup()
    return str(resp)


def apologize_and_hang_up(text: str) -> str:
    """Twilio's own voice: the bot's is gone once its stream cannot be brought back."""
    resp = VoiceResponse()
    resp.say(text)
    resp.hangup()
    return str(resp)


def reject() -> str:
    resp = VoiceResponse()
    resp.reject(reason="busy")
    return str(resp)
