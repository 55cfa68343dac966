"""What ops/logs.py must mask that a plain "digit run" rule missed, and what it must leave alone so an on-call
engineer can still correlate lines: spoken digits, separated digits, numbers in URLs/JSON/SIP URIs and
headers, credentials inside free text, the websockets wire trace at DEBUG; call ids, SIDs, UUIDs, timestamps
and IP:port verbatim."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ops.logs import mask_digits, redact_processor
from tests.conftest import ROOT


@pytest.mark.parametrize("text, secret", [
    ("my account number is 4 2 7 1 9 9 3 8", "42719938"),
    ("acct 427-199-38", "42719938"),
    ("my account number is four two seven one nine nine three eight", "four two seven"),
    ("my account number is four two seven one nine nine thre eight", "nine nine thre"),  # CTC spelling
    ("Four-two-seven, one nine nine, three eight", "seven, one"),
    ("it is oh five five five, one two three four", "five five five"),
    ("double five one two three four five", "one two three"),
    ("4 two 7 1 nine 9 3 8", "4 two 7"),
    ('https://cb.example/status?From=%2B15551234567&n=1', "5551234567"),
    ('{"From": "+15551234567", "To": "+15550100999"}', "5551234567"),
    ("sip:+15551234567@pbx.example.com", "5551234567"),
    ('From: "Bob" <sip:+15551234567@10.0.0.1>;tag=8f3a', "5551234567"),
    ("tel:+1-555-123-4567", "555-123-4567"),
    ("phone 415.555.0134", "555.0134"),
])
def test_digits_that_identify_a_caller_are_masked(text: str, secret: str) -> None:
    out = mask_digits(text)
    assert secret not in out, out
    assert "*****" in out


@pytest.mark.parametrize("text", [
    "call CA1234567890abcdef1234567890abcdef on stream MZ0987654321fedcba0987654321fedcba",
    "sip call 42649727b0b947f836e4@127.0.0.1 replaced",
    "request 550e8400-e29b-41d4-a716-446655440000",
    "at 2026-12-01T03:50:09.123456Z",
    "from 192.168.100.200:5060",
    "branch z9hG4bK4271993866abc",
    "turn 3 took 240 ms",
    "I want to pay one two three dollars",  # 3 digits: an amount, not an account
    "I want to go to the store for two or three days",
    "pay 50 dollars on the 1st",
    "grüße, ça va: ünïcödé 12",
])
def test_identifiers_and_ordinary_speech_are_left_alone(text: str) -> None:
    assert mask_digits(text) == text


def test_processor_keeps_call_ids_verbatim_and_redacts_credentials_in_text() -> None:
    event = {
        "event": "call_replaced",
        "call_id": "8012345678@10.0.0.1",
        "replaced_call_id": "8012345679@10.0.0.1",  # all-digit SIP Call-IDs must still join
        "stream_sid": "MZ0987654321fedcba0987654321fedcba",
        "user_agent": "FPBX-16.0.33(18.13.0)",
        "transcript": "my card is four one one one one one one one",
        "detail": "< x-twilio-signature: c2lnbmF0dXJlMTIz",
        "error": "401 for https://api.example/v1?token=abc123&x=1 with Bearer eyJhbGciOi.xyz",
        "admin_token": "t0ken", "sip_password": "pw",
    }
    out = redact_processor(None, "info", dict(event))
    assert out["call_id"] == event["call_id"] and out["replaced_call_id"] == event["replaced_call_id"]
    assert out["stream_sid"] == event["stream_sid"] and out["user_agent"] == event["user_agent"]
    assert "four one one" not in out["transcript"] and out["transcript"].endswith("11")
    assert "c2lnbmF0dXJlMTIz" not in out["detail"]
    assert "abc123" not in out["error"] and "eyJhbGciOi" not in out["error"] and "x=1" in out["error"]
    assert out["admin_token"] == "[redacted]" and out["sip_password"] == "[redacted]"


def test_debug_level_drops_the_websocket_wire_trace() -> None:
    """BOT_LOG_LEVEL=DEBUG must stay readable: the websockets library logs every media frame (a slice of the
    caller's audio) and every handshake header (the Twilio signature) under uvicorn.error."""
    code = ("from ops.logs import configure_logging\n"
            "configure_logging('DEBUG')\n"
            "import logging\n"
            "u = logging.getLogger('uvicorn.error')\n"
            "u.debug('< x-twilio-signature: %s', 'c2lnbmF0dXJl')\n"
            "u.debug('> TEXT %s [%d bytes]', '{\"event\":\"media\",\"media\":{\"payload\":\"/////\"}}', 200)\n"
            "u.debug('= connection is OPEN')\n"
            "u.info('%s - \"WebSocket %s\" [accepted]', '127.0.0.1:1234', '/twilio/stream')\n"
            "u.info('%s - \"WebSocket %s\" 403', '127.0.0.1:1234', '/twilio/stream')\n"
            "logging.getLogger('httpx').info('HTTP Request: POST %s 200', 'https://api.twilio.com/x')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line)["event"] for line in r.stderr.splitlines()]
    # at DEBUG httpx's per-request line stays (it is a trace then)
    assert events == ["= connection is OPEN", '127.0.0.1:1234 - "WebSocket /twilio/stream" 403',
                      "HTTP Request: POST https://api.twilio.com/x 200"]


def test_info_level_is_the_calls_story_not_library_requests() -> None:
    code = ("from ops.logs import configure_logging\n"
            "configure_logging('INFO')\n"
            "import logging\n"
            "logging.getLogger('httpx').info('HTTP Request: POST %s 200', 'https://api.twilio.com/x')\n"
            "logging.getLogger('httpx').warning('retrying')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert [json.loads(line)["event"] for line in r.stderr.splitlines()] == ["retrying"]
