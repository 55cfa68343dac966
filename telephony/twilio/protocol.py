"""Media Streams wire format: parse inbound JSON messages, build outbound ones.

Parsing is strict and cheap: every malformed message raises ProtocolError with a `kind` that ends
up as the `kind` label of voicebot_errors_total and as the call's outcome when it is fatal.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

# A Twilio media payload is 20 ms (160 bytes of mu-law). Allow bursts up to 200 ms per message
# (some carriers and our own tests batch frames) but refuse anything larger: it cannot be a phone
# line and would let one client make us decode arbitrarily large buffers.
MAX_MEDIA_BYTES = 1600
MAX_MESSAGE_CHARS = 8192

EVENTS = ("connected", "start", "media", "mark", "dtmf", "stop")


class ProtocolError(Exception):
    """A message we refuse. `fatal` ones end the call (the peer is not speaking Media Streams)."""

    def __init__(self, kind: str, detail: str = "", fatal: bool = False) -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail
        self.fatal = fatal


@dataclass(frozen=True)
class StartInfo:
    stream_sid: str
    call_sid: str
    account_sid: str
    custom: dict[str, str] = field(default_factory=dict)
    encoding: str = "audio/x-mulaw"
    sample_rate: int = 8000


@dataclass(frozen=True)
class Message:
    event: str
    stream_sid: str = ""
    payload: bytes = b""  # media: raw mu-law bytes
    name: str = ""  # mark name
    digit: str = ""  # dtmf digit
    start: StartInfo | None = None


def parse(text: str | bytes) -> Message:
    if len(text) > MAX_MESSAGE_CHARS:
        raise ProtocolError("oversized_message", f"{len(text)} chars")
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("malformed_json", str(exc)[:80]) from None
    if not isinstance(obj, dict):
        raise ProtocolError("malformed_json", "not an object")
    event = obj.get("event")
    if event not in EVENTS:
        raise ProtocolError("unknown_event", str(event)[:40])
    sid = obj.get("streamSid") or ""
    if not isinstance(sid, str):
        raise ProtocolError("malformed_json", "streamSid")
    if event == "media":
        media = obj.get("media")
        if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
            raise ProtocolError("malformed_json", "media.payload")
        b64 = media["payload"]
        if len(b64) > (MAX_MEDIA_BYTES * 4) // 3 + 4:
            raise ProtocolError("oversized_frame", f"{len(b64)} base64 chars")
        try:
            payload = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("bad_base64") from None
        return Message("media", sid, payload=payload)
    if event == "mark":
        mark = obj.get("mark")
        if not isinstance(mark, dict) or not isinstance(mark.get("name"), str):
            raise ProtocolError("malformed_json", "mark.name")
        return Message("mark", sid, name=mark["name"])
    if event == "dtmf":
        dtmf = obj.get("dtmf")
        digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
        if not isinstance(digit, str) or len(digit) != 1 or digit not in "0123456789*#ABCD":
            raise ProtocolError("bad_dtmf", str(digit)[:8])
        return Message("dtmf", sid, digit=digit)
    if event == "start":
        start = obj.get("start")
        if not isinstance(start, dict):
            raise ProtocolError("malformed_json", "start", fatal=True)
        fmt = start.get("mediaFormat") or {}
        if not isinstance(fmt, dict):
            raise ProtocolError("malformed_json", "start.mediaFormat", fatal=True)
        enc = str(fmt.get("encoding", "audio/x-mulaw"))
        rate_raw = fmt.get("sampleRate", 8000) or 8000
        try:
            rate = int(rate_raw)
        except (TypeError, ValueError):  # "abc", a list, ...: not a rate we can play
            raise ProtocolError("unsupported_format", f"{enc}/{str(rate_raw)[:20]}", fatal=True) from None
        if enc != "audio/x-mulaw" or rate != 8000:
            raise ProtocolError("unsupported_format", f"{enc}/{rate}", fatal=True)
        ids = {k: start.get(k) or "" for k in ("streamSid", "callSid", "accountSid")}
        if not all(isinstance(v, str) for v in ids.values()):
            raise ProtocolError("malformed_json", "start ids must be strings", fatal=True)
        custom = start.get("customParameters") or {}
        info = StartInfo(
            stream_sid=ids["streamSid"] or sid,
            call_sid=ids["callSid"],
            account_sid=ids["accountSid"],
            custom={str(k): str(v) for k, v in custom.items()} if isinstance(custom, dict) else {},
        )
        if not info.call_sid or not info.stream_sid:
            raise ProtocolError("malformed_json", "start without callSid/streamSid", fatal=True)
        return Message("start", info.stream_sid, start=info)
    return Message(event, sid)


# Outbound messages are built as strings: one json.dumps per 20 ms frame is measurable at scale.
def media_msg(stream_sid: str, mulaw: bytes) -> str:
    return '{"event":"media","streamSid":"%s","media":{"payload":"%s"}}' % (
        stream_sid,
        base64.b64encode(mulaw).decode("ascii"),
    )


def mark_msg(stream_sid: str, name: str) -> str:
    return json.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def clear_msg(stream_sid: str) -> str:
    return '{"event":"clear","streamSid":"%s"}' % stream_sid


def event_json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))
