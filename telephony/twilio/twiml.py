"""TwiML documents, built with the twilio library's classes (escaping handled there)."""

from __future__ import annotations

import re

from twilio.twiml.voice_response import Connect, VoiceResponse

_DIALABLE = re.compile(r"^(\+?\d{3,15}|sips?:.+)$")


def connect_stream(stream_url: str, params: dict[str, str]) -> str:
    """<Connect><Stream>: a bidirectional stream. Nothing follows <Connect>, so the call ends when
    the bot closes the WebSocket."""
    resp = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=stream_url)
    for name, value in params.items():
        if value:
            stream.parameter(name=name, value=value)
    resp.append(connect)
    return str(resp)


def transfer(target: str) -> str:
    """A number or SIP URI is dialed; anything else is a TaskRouter/queue name to enqueue."""
    resp = VoiceResponse()
    if _DIALABLE.match(target):
        if target.startswith("sip"):
            dial = resp.dial()
            dial.sip(target)
        else:
            resp.dial(target)
    else:
        resp.enqueue(target)
    return str(resp)


def reject() -> str:
    resp = VoiceResponse()
    resp.reject(reason="busy")
    return str(resp)
