"""The Twilio routes as Twilio and a reverse proxy reach them: the voice webhook behind a TLS terminator or a
path-prefixed public URL, repeated and unicode POST parameters, SharedKey signatures, bad or missing
signatures (403, logged with the URL checked, counted, never a TwiML that connects), a draining worker, a
garbled body, and the transfer action callback (agent never answered: an apology, not dead air).

The real router and SignatureChecker in an app wrapped the way `bot serve` runs it (uvicorn's proxy-header
middleware, i.e. proxy_headers=True)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any, Iterable
from urllib.parse import urlencode
from xml.etree import ElementTree

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from structlog.testing import capture_logs
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from ops import metrics
from telephony.twilio.bridge import TwilioCallBridge
from telephony.twilio.server import TwilioRouteConfig, make_router
from telephony.twilio.signature import SignatureChecker

TOKEN = "qa-auth-token-0123"
SHARED = "qa-shared-key-secret"
FORM = [("CallSid", "CA" + "b" * 32), ("AccountSid", "AC" + "1" * 32), ("From", "+15550100123"),
        ("To", "+15550100999"), ("Direction", "inbound")]


def sign(url: str, params: Iterable[tuple[str, str]], key: str = TOKEN, algo: Any = hashlib.sha1) -> str:
    """Twilio's scheme, written out: the URL, then each key (sorted) with each of its values (sorted)."""
    grouped: dict[str, set[str]] = {}
    for k, v in params:
        grouped.setdefault(k, set()).add(v)
    s = url + "".join(k + v for k in sorted(grouped) for v in sorted(grouped[k]))
    return base64.b64encode(hmac.new(key.encode(), s.encode(), algo).digest()).decode()


def _app(public_url: str = "", draining: bool = False, shared_key: str = "",
         outcomes: list[tuple[str, str, bool]] | None = None) -> tuple[TestClient, list]:
    calls: list[TwilioCallBridge] = []

    async def on_call(bridge: TwilioCallBridge) -> None:
        calls.append(bridge)
        await bridge.hangup("test")

    cfg = TwilioRouteConfig(checker=SignatureChecker(TOKEN, public_url, shared_key), rest=None,
                            public_url=public_url, is_draining=lambda: draining,
                            on_transfer_outcome=(lambda *a: outcomes.append(a)) if outcomes is not None else None)
    app = FastAPI()
    app.include_router(make_router(on_call, cfg))
    # what uvicorn does with proxy_headers=True, forwarded_allow_ips="*" (bot/serve.py)
    return TestClient(ProxyHeadersMiddleware(app, trusted_hosts="*"), base_url="http://127.0.0.1:8080"), calls


def _post(client: TestClient, path: str, params: list[tuple[str, str]], headers: dict[str, str]) -> Any:
    return client.post(path, content=urlencode(params),
                       headers={"content-type": "application/x-www-form-urlencoded", **headers})


def _stream_url(resp: Any) -> str:
    doc = ElementTree.fromstring(resp.text)
    stream = doc.find("./Connect/Stream")
    assert stream is not None, resp.text
    return stream.get("url") or ""


def _stream_params(resp: Any) -> dict[str, str]:
    stream = ElementTree.fromstring(resp.text).find("./Connect/Stream")
    assert stream is not None, resp.text
    return {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}


def _start(call_sid: str, custom: dict[str, str]) -> dict[str, Any]:
    return {"event": "start", "streamSid": "MZ1", "start": {
        "streamSid": "MZ1", "callSid": call_sid, "accountSid": FORM[1][1],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}, "customParameters": custom}}


def _count(counter: Any, *labels: str) -> float:
    return counter.labels(*labels)._value.get()


def test_behind_a_tls_terminator_without_public_url() -> None:
    """nginx terminates TLS and forwards to http://127.0.0.1:8080 with X-Forwarded-Proto/Host: the signature
    Twilio made over https://bot.example.com/... checks out, and the stream URL points at the public host."""
    client, _ = _app()
    sig = sign("https://bot.example.com/twilio/voice", FORM)
    r = _post(client, "/twilio/voice", FORM, {"X-Twilio-Signature": sig, "X-Forwarded-Proto": "https",
                                              "X-Forwarded-Host": "bot.example.com", "Host": "127.0.0.1:8080"})
    assert r.status_code == 200, r.text
    assert _stream_url(r) == "wss://bot.example.com/twilio/stream"


def test_public_url_with_a_path_prefix_and_a_query_string() -> None:
    """BOT_PUBLIC_URL=https://pub.example.com/voicebot, the proxy strips /voicebot: what Twilio signed and
    where it must open the stream both carry the prefix."""
    client, calls = _app(public_url="https://pub.example.com/voicebot/")
    url = "https://pub.example.com/voicebot/twilio/voice?tenant=acme%20corp&x=1"
    r = _post(client, "/twilio/voice?tenant=acme%20corp&x=1", FORM, {"X-Twilio-Signature": sign(url, FORM)})
    assert r.status_code == 200, r.text
    stream_url = _stream_url(r)
    assert stream_url == "wss://pub.example.com/voicebot/twilio/stream"
    # the WebSocket upgrade Twilio then makes, signed over that URL, is accepted
    with client.websocket_connect("/twilio/stream", headers={"X-Twilio-Signature": sign(stream_url, [])}) as ws:
        ws.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        ws.send_json(_start(FORM[0][1], _stream_params(r)))  # Twilio hands the <Parameter>s back in `start`
        ws.receive()  # the bot hangs up (test callback): the socket closes
    assert [b.info.call_id for b in calls] == [FORM[0][1]]
    assert calls[0].info.caller == "+15550100123" and "VoicebotStreamToken" not in calls[0].info.params


def test_a_replayed_stream_handshake_without_the_calls_token_gets_no_call() -> None:
    """The handshake signature covers only the fixed stream URL: anyone who once saw it could replay it and
    occupy the engine. A stream must also bring the token the webhook issued for that very call."""
    client, calls = _app(public_url="https://pub.example.com")
    r = _post(client, "/twilio/voice", FORM, {"X-Twilio-Signature": sign("https://pub.example.com/twilio/voice", FORM)})
    token = _stream_params(r)["VoicebotStreamToken"]
    expired = SignatureChecker(TOKEN).stream_token(FORM[0][1], now=time.time() - 600)  # issued 10 minutes ago
    before = _count(metrics.ERRORS, "twilio", "bad_stream_token")
    handshake = {"X-Twilio-Signature": sign("wss://pub.example.com/twilio/stream", [])}
    with capture_logs() as logs:
        for call_sid, custom in (("CA" + "c" * 32, {}),  # no token
                                 ("CA" + "c" * 32, {"VoicebotStreamToken": token}),  # another call's token
                                 (FORM[0][1], {"VoicebotStreamToken": expired})):
            with client.websocket_connect("/twilio/stream", headers=handshake) as ws:
                ws.send_json(_start(call_sid, custom))
                with pytest.raises(WebSocketDisconnect) as closed:
                    ws.receive_json()
                assert closed.value.code == 1008  # policy violation
    assert calls == [] and _count(metrics.ERRORS, "twilio", "bad_stream_token") == before + 3
    assert [e["reason"] for e in logs if e["event"] == "stream_forbidden"] == [
        "bad_stream_token:missing", "bad_stream_token:invalid", "bad_stream_token:expired"]


def test_repeated_keys_and_unicode_values_are_signed_like_twilio_does() -> None:
    client, _ = _app()
    params = [*FORM, ("CallerName", "Zoë Ünïcødé 北京"), ("ForwardedFrom", "+15550001"),
              ("ForwardedFrom", "+15550002"), ("Note", "a+b & c=d")]
    sig = sign("http://127.0.0.1:8080/twilio/voice", params)
    r = _post(client, "/twilio/voice", params, {"X-Twilio-Signature": sig})
    assert r.status_code == 200, r.text
    # and the parameters carried to the stream are escaped, the document valid
    weird = [("CallSid", FORM[0][1]), ("From", '"><Hangup/>&amp;'), ("To", "+1555")]
    r = _post(client, "/twilio/voice", weird,
              {"X-Twilio-Signature": sign("http://127.0.0.1:8080/twilio/voice", weird)})
    stream = ElementTree.fromstring(r.text).find("./Connect/Stream")
    assert stream is not None and ElementTree.fromstring(r.text).find(".//Hangup") is None
    assert {p.get("name"): p.get("value") for p in stream.findall("Parameter")}["From"] == '"><Hangup/>&amp;'


def test_bad_missing_or_misaddressed_signature_is_403_logged_and_counted() -> None:
    client, _ = _app(public_url="https://pub.example.com")
    before = _count(metrics.ERRORS, "twilio", "bad_signature")
    with capture_logs() as logs:
        for headers in ({}, {"X-Twilio-Signature": "bm9wZQ=="},
                        # signed for the local URL, not the public one Twilio uses
                        {"X-Twilio-Signature": sign("http://127.0.0.1:8080/twilio/voice", FORM)}):
            r = _post(client, "/twilio/voice", FORM, headers)
            assert r.status_code == 403 and "<Connect" not in r.text
    assert _count(metrics.ERRORS, "twilio", "bad_signature") == before + 3
    forbidden = [e for e in logs if e["event"] == "webhook_forbidden"]
    assert [e["reason"] for e in forbidden] == ["bad_signature:missing", "bad_signature:invalid", "bad_signature:invalid"]
    assert all(e["call_id"] == FORM[0][1] and e["checked_url"] == "https://pub.example.com/twilio/voice"
               for e in forbidden)


def test_shared_key_signatures() -> None:
    """A Twilio Webhook Rule signs with a SharedKey and HMAC-SHA256 (X-Twilio-Webhooks-Signature-Settings)."""
    url = "http://127.0.0.1:8080/twilio/voice"
    headers = {"X-Twilio-Signature": sign(url, FORM, SHARED, hashlib.sha256),
               "X-Twilio-Webhooks-Signature-Settings": "key=webhooks_sharedkey_1,algorithm=HMAC_SHA256"}
    client, _ = _app(shared_key=SHARED)
    assert _post(client, "/twilio/voice", FORM, headers).status_code == 200
    client, _ = _app()  # no shared key configured: refused with the reason in the log
    with capture_logs() as logs:
        assert _post(client, "/twilio/voice", FORM, headers).status_code == 403
    assert any(e.get("reason") == "bad_signature:shared_key_not_configured" for e in logs)


def test_draining_worker_answers_503_with_retry_after_not_busy() -> None:
    """Twilio tries the number's Fallback URL (the load balancer: a healthy worker) on a 5xx; <Reject busy> played
    a busy tone to a caller while other workers were up."""
    client, _ = _app(draining=True)
    before = _count(metrics.CALLS_TOTAL, "twilio", "refused_draining")
    r = _post(client, "/twilio/voice", FORM, {"X-Twilio-Signature": sign("http://127.0.0.1:8080/twilio/voice", FORM)})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "<Reject" not in r.text and "<Connect" not in r.text
    assert _count(metrics.CALLS_TOTAL, "twilio", "refused_draining") == before + 1


def test_garbled_or_huge_body_is_refused_not_500() -> None:
    client, _ = _app()
    before = _count(metrics.ERRORS, "twilio", "bad_request")
    r = client.post("/twilio/voice", content=b"--x\r\nContent-Disposition: form-data\r\n\r\n\xff\xfe",
                    headers={"content-type": "multipart/form-data; boundary=x", "X-Twilio-Signature": "bm9wZQ=="})
    assert r.status_code == 400, r.status_code
    # read before any signature is checked, so never buffered without a bound
    r = _post(client, "/twilio/voice", [*FORM, ("Junk", "x" * 200_000)], {"X-Twilio-Signature": "bm9wZQ=="})
    assert r.status_code == 413, r.status_code
    assert _count(metrics.ERRORS, "twilio", "bad_request") == before + 2
    # a blank value is a parameter Twilio signed: kept
    form = [*FORM, ("CallerName", "")]
    r = _post(client, "/twilio/voice", form, {"X-Twilio-Signature": sign("http://127.0.0.1:8080/twilio/voice", form)})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("params,apology", [
    ([("DialCallStatus", "no-answer")], True),
    ([("DialCallStatus", "busy")], True),
    ([("DialCallStatus", "completed")], False),
    ([("QueueResult", "queue-full")], True),
    ([("QueueResult", "bridged")], False),
])
def test_transfer_action_apologizes_when_no_agent_took_the_call(params: list[tuple[str, str]], apology: bool) -> None:
    outcomes: list[tuple[str, str, bool]] = []
    client, _ = _app(public_url="https://pub.example.com", outcomes=outcomes)
    form = [*FORM, *params]
    r = _post(client, "/twilio/transfer-status", form,
              {"X-Twilio-Signature": sign("https://pub.example.com/twilio/transfer-status", form)})
    assert r.status_code == 200, r.text
    tags = [c.tag for c in ElementTree.fromstring(r.text)]
    assert tags == (["Say", "Hangup"] if apology else ["Hangup"])
    assert outcomes == [(FORM[0][1], params[0][1], not apology)]  # handed on for the call record
    assert _post(client, "/twilio/transfer-status", form, {}).status_code == 403
    assert len(outcomes) == 1  # a forged report changes nothing
