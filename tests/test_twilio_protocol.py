"""Media Streams parsing, outbound messages, TwiML and signatures (no network)."""

from __future__ import annotations

import base64
import json
from xml.etree import ElementTree

import pytest
from twilio.request_validator import RequestValidator

from telephony.twilio import protocol, twiml
from telephony.twilio.signature import SignatureChecker


def _media(payload: str) -> str:
    return json.dumps({"event": "media", "streamSid": "MZ1", "media": {"payload": payload}})


def test_parse_media_and_start() -> None:
    m = protocol.parse(_media(base64.b64encode(b"\xff" * 160).decode()))
    assert m.event == "media" and m.payload == b"\xff" * 160
    start = protocol.parse(json.dumps({"event": "start", "start": {
        "streamSid": "MZ1", "callSid": "CA1", "accountSid": "AC1",
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}, "customParameters": {"From": "+1555"}}}))
    assert start.start is not None and start.start.call_sid == "CA1" and start.start.custom["From"] == "+1555"
    assert protocol.parse('{"event":"dtmf","streamSid":"MZ1","dtmf":{"digit":"5"}}').digit == "5"
    assert protocol.parse('{"event":"mark","streamSid":"MZ1","mark":{"name":"3:200"}}').name == "3:200"


@pytest.mark.parametrize("text,kind", [
    ("{not json", "malformed_json"),
    ("[1,2]", "malformed_json"),
    ('{"event":"bogus"}', "unknown_event"),
    (_media("!!!notbase64!!!"), "bad_base64"),
    (_media(base64.b64encode(b"\x00" * 4000).decode()), "oversized_frame"),
    ('{"event":"media","media":{}}', "malformed_json"),
    ('{"event":"dtmf","dtmf":{"digit":"55"}}', "bad_dtmf"),
    ("x" * 10000, "oversized_message"),
])
def test_bad_messages_have_kinds(text: str, kind: str) -> None:
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.parse(text)
    assert exc.value.kind == kind


def test_start_with_other_codec_is_fatal() -> None:
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.parse(json.dumps({"event": "start", "start": {"streamSid": "MZ", "callSid": "CA",
                                   "mediaFormat": {"encoding": "audio/l16", "sampleRate": 16000}}}))
    assert exc.value.fatal and exc.value.kind == "unsupported_format"


@pytest.mark.parametrize("start,kind", [
    ({"streamSid": "MZ", "callSid": "CA", "mediaFormat": {"sampleRate": "abc"}}, "unsupported_format"),
    ({"streamSid": "MZ", "callSid": "CA", "mediaFormat": {"sampleRate": [8000]}}, "unsupported_format"),
    ({"streamSid": "MZ", "callSid": "CA", "mediaFormat": "audio/x-mulaw"}, "malformed_json"),
    ({"streamSid": "MZ", "callSid": {"sid": "CA"}}, "malformed_json"),
    ({"streamSid": ["MZ"], "callSid": "CA"}, "malformed_json"),
])
def test_malformed_start_is_a_protocol_error_not_an_exception(start: dict, kind: str) -> None:
    """A broken `start` is a refused message (logged, counted, recorded by kind), never a stray
    ValueError/AttributeError that the stream loop can only report as `error:exception`."""
    with pytest.raises(protocol.ProtocolError) as exc:
        protocol.parse(json.dumps({"event": "start", "start": start}))
    assert exc.value.fatal and exc.value.kind == kind


def test_outbound_messages_are_valid_json() -> None:
    m = json.loads(protocol.media_msg("MZ1", b"\x01\x02"))
    assert m == {"event": "media", "streamSid": "MZ1", "media": {"payload": base64.b64encode(b"\x01\x02").decode()}}
    assert json.loads(protocol.clear_msg("MZ1")) == {"event": "clear", "streamSid": "MZ1"}
    assert json.loads(protocol.mark_msg("MZ1", "a:1"))["mark"]["name"] == "a:1"


def test_twiml_connect_stream_and_transfer() -> None:
    doc = ElementTree.fromstring(twiml.connect_stream("wss://h/twilio/stream", {"From": "+15551234567", "To": ""}))
    stream = doc.find("./Connect/Stream")
    assert stream is not None and stream.get("url") == "wss://h/twilio/stream"
    assert [(p.get("name"), p.get("value")) for p in stream.findall("Parameter")] == [("From", "+15551234567")]
    assert "<Enqueue>billing</Enqueue>" in twiml.transfer("billing")
    assert "<Dial>+15550001111</Dial>" in twiml.transfer("+15550001111")
    assert "<Sip>sip:agent@pbx</Sip>" in twiml.transfer("sip:agent@pbx")


def test_signature_checker() -> None:
    token = "secret-token"
    chk = SignatureChecker(token)
    url = "http://h:1/twilio/voice"
    form = {"CallSid": "CA1", "From": "+1555"}
    good = RequestValidator(token).compute_signature(url, form)
    assert chk.valid_webhook(url, form, good)
    assert not chk.valid_webhook(url, form, "forged")
    assert not chk.valid_webhook(url, form, None)
    ws_sig = RequestValidator(token).compute_signature("wss://h:1/twilio/stream", {})
    assert chk.valid_stream("h:1", "/twilio/stream", "", ws_sig)
    assert not chk.valid_stream("h:1", "/twilio/stream", "", good)
    # behind a tunnel the public host is what Twilio signed
    pub = SignatureChecker(token, "https://bot.example.com")
    sig = RequestValidator(token).compute_signature("wss://bot.example.com/twilio/stream", {})
    assert pub.valid_stream("127.0.0.1:8080", "/twilio/stream", "", sig)
    assert SignatureChecker("").valid_webhook(url, form, None)  # no token: checks disabled
