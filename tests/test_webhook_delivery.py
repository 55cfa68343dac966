"""The escalation webhook's delivery (bot/escalation_webhook.py) against a real local HTTP receiver that
answers as scripted: signed bodies, retries on 5xx/429/timeouts/refused connections (never on other 4xx),
one delivery id across retries, the bound on deliveries in flight, and the shutdown flush."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest
from prometheus_client import REGISTRY

from bot.escalation_webhook import EscalationWebhook, sign, verify

SECRET = "whsec_test"
CTX = {"call_id": "CAweb1", "intent": "pay_bill", "slots": {"amount": 40}, "reason": "agent_requested",
       "target": "billing", "transport": "twilio"}


class Receiver:
    """Answers each POST with the next scripted action: a status, ("sleep", s, status) or "close"
    (drop the connection unanswered); 200 once the script is used up."""

    def __init__(self, script: list[Any] | None = None) -> None:
        self.script = list(script or [])
        self.got: list[dict[str, Any]] = []
        self.release = threading.Event()  # ends every pending "sleep" early (test teardown)
        rcv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_a: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                rcv.got.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "raw": raw,
                                "t": time.monotonic()})
                action = rcv.script.pop(0) if rcv.script else 200
                if action == "close":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                extra: dict[str, str] = {}
                if isinstance(action, tuple) and action[0] == "sleep":
                    rcv.release.wait(action[1])
                    action = action[2]
                elif isinstance(action, tuple) and action[0] == "retry_after":
                    extra["Retry-After"] = str(action[1])
                    action = action[2]
                self.send_response(int(action))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("content-length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hooks/voicebot"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _count(event: str, result: str) -> float:
    return REGISTRY.get_sample_value("voicebot_webhook_deliveries_total", {"event": event, "result": result}) or 0.0


def _errors(kind: str) -> float:
    return REGISTRY.get_sample_value("voicebot_errors_total", {"component": "escalation_webhook", "kind": kind}) or 0.0


async def _until(cond: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}/hooks"


async def test_signed_delivery_carries_event_delivery_id_and_exact_body(receiver: Receiver) -> None:
    ok0 = _count("transfer", "ok")
    hook = EscalationWebhook(receiver.url, SECRET, backoff_s=0.05)
    await hook(CTX)
    await _until(lambda: hook.pending == 0)
    await hook.close(1)
    assert len(receiver.got) == 1
    h, raw = receiver.got[0]["headers"], receiver.got[0]["raw"]
    body = json.loads(raw)
    assert body["event"] == "transfer" and h["x-voicebot-event"] == "transfer"
    assert body["delivery_id"] == h["x-voicebot-delivery"] and len(h["x-voicebot-delivery"]) == 32
    assert {k: body[k] for k in CTX} == CTX  # the hand-off context is the body, as before
    assert h["content-type"] == "application/json"
    # the receiver can verify the exact bytes it got; a changed byte, another secret or an old timestamp fail
    assert verify(SECRET, h["x-voicebot-timestamp"], raw, h["x-voicebot-signature"])
    assert h["x-voicebot-signature"] == sign(SECRET, h["x-voicebot-timestamp"], raw)
    assert not verify(SECRET, h["x-voicebot-timestamp"], raw.replace(b"40", b"41"), h["x-voicebot-signature"])
    assert not verify("other", h["x-voicebot-timestamp"], raw, h["x-voicebot-signature"])
    assert not verify(SECRET, h["x-voicebot-timestamp"], raw, h["x-voicebot-signature"],
                      now=int(h["x-voicebot-timestamp"]) + 3600)  # a replay an hour later
    assert _count("transfer", "ok") == ok0 + 1


async def test_no_secret_means_no_signature_header(receiver: Receiver) -> None:
    hook = EscalationWebhook(receiver.url)
    hook.notify({**CTX, "callback": True, "caller": "+15550100123"})
    await _until(lambda: hook.pending == 0)
    await hook.close(1)
    h = receiver.got[0]["headers"]
    assert "x-voicebot-signature" not in h and h["x-voicebot-timestamp"].isdigit()
    assert h["x-voicebot-event"] == "callback"  # an accepted callback is named as such
    assert json.loads(receiver.got[0]["raw"])["caller"] == "+15550100123"


async def test_500_then_200_is_retried_with_the_same_delivery_id(receiver: Receiver) -> None:
    receiver.script = [500, 503, 200]
    ok0, retried0 = _count("transfer", "ok"), _count("transfer", "retried")
    hook = EscalationWebhook(receiver.url, SECRET, backoff_s=0.05)
    hook.notify(CTX)
    await _until(lambda: hook.pending == 0)
    await hook.close(1)
    assert len(receiver.got) == 3
    ids = {g["headers"]["x-voicebot-delivery"] for g in receiver.got}
    assert len(ids) == 1  # the receiver de-duplicates on it
    assert len({g["raw"] for g in receiver.got}) == 1  # the same body each time
    assert all(verify(SECRET, g["headers"]["x-voicebot-timestamp"], g["raw"], g["headers"]["x-voicebot-signature"])
               for g in receiver.got)
    assert _count("transfer", "retried") == retried0 + 2 and _count("transfer", "ok") == ok0 + 1


async def test_timeout_and_dropped_connection_are_retried(receiver: Receiver) -> None:
    receiver.script = [("sleep", 3.0, 200), "close", 200]
    ok0 = _count("transfer", "ok")
    hook = EscalationWebhook(receiver.url, SECRET, timeout_s=0.3, backoff_s=0.05)
    hook.notify(CTX)
    await _until(lambda: hook.pending == 0)
    await hook.close(1)
    assert len(receiver.got) == 3 and _count("transfer", "ok") == ok0 + 1


async def test_429_honours_retry_after_and_4xx_is_not_retried(receiver: Receiver) -> None:
    receiver.script = [("retry_after", 0, 429), 200, 400]
    ok0, failed0, rejected0 = _count("transfer", "ok"), _count("transfer", "failed"), _errors("rejected")
    hook = EscalationWebhook(receiver.url, SECRET, backoff_s=0.05)
    hook.notify(CTX)
    await _until(lambda: hook.pending == 0)
    assert len(receiver.got) == 2 and _count("transfer", "ok") == ok0 + 1
    hook.notify(CTX)  # 400: the receiver refuses this body; sending it again cannot help
    await _until(lambda: hook.pending == 0)
    await asyncio.sleep(0.3)
    await hook.close(1)
    assert len(receiver.got) == 3
    assert _count("transfer", "failed") == failed0 + 1 and _errors("rejected") == rejected0 + 1


async def test_receiver_down_gives_up_after_bounded_attempts() -> None:
    failed0, err0, retried0 = _count("transfer", "failed"), _errors("failed"), _count("transfer", "retried")
    hook = EscalationWebhook(_closed_port_url(), SECRET, max_attempts=3, backoff_s=0.05)
    hook.notify(CTX)
    await _until(lambda: hook.pending == 0)
    await hook.close(1)
    assert _count("transfer", "retried") == retried0 + 2
    assert _count("transfer", "failed") == failed0 + 1 and _errors("failed") == err0 + 1


async def test_notify_never_waits_and_in_flight_is_bounded(receiver: Receiver) -> None:
    receiver.script = [("sleep", 30.0, 200)] * 5
    dropped0 = _count("transfer", "dropped")
    hook = EscalationWebhook(receiver.url, SECRET, max_pending=2, timeout_s=60)
    ids = [hook.notify({**CTX, "call_id": f"CAbound{i}"}) for i in range(3)]  # synchronous: nothing awaited
    assert all(ids) and len(set(ids)) == 3
    assert hook.pending == 2  # the oldest was dropped to make room
    assert _count("transfer", "dropped") == dropped0 + 1
    await _until(lambda: len(receiver.got) == 2)
    assert {json.loads(g["raw"])["call_id"] for g in receiver.got} == {"CAbound1", "CAbound2"}
    # shutdown: the grace runs out while the receiver still sleeps; what is left is dropped and counted
    await hook.close(0.2)
    assert hook.pending == 0 and _count("transfer", "dropped") == dropped0 + 3
    assert hook.notify(CTX) is None and _count("transfer", "dropped") == dropped0 + 4  # closed: refused, counted


async def test_close_gives_pending_retries_the_grace(receiver: Receiver) -> None:
    receiver.script = [500, 500]
    ok0 = _count("callback", "ok")
    hook = EscalationWebhook(receiver.url, SECRET, backoff_s=0.2)
    hook.notify({**CTX, "callback": True})
    await hook.close(20)  # returns once delivered, well before the grace
    assert len(receiver.got) == 3 and _count("callback", "ok") == ok0 + 1


async def test_unserialisable_context_is_refused_not_raised(receiver: Receiver) -> None:
    bad: dict[str, Any] = {"call_id": "CAbad"}
    bad["self"] = bad  # a cycle: json cannot encode it
    err0 = _errors("bad_context")
    hook = EscalationWebhook(receiver.url)
    assert hook.notify(bad) is None and hook.pending == 0
    await hook.close(1)
    assert _errors("bad_context") == err0 + 1 and not receiver.got


def test_a_webhook_url_that_is_no_http_url_stops_start_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.config import ConfigError, load_settings

    monkeypatch.setenv("BOT_ESCALATION_WEBHOOK", "hooks.example.com/voicebot")  # scheme forgotten
    with pytest.raises(ConfigError, match="BOT_ESCALATION_WEBHOOK=.*http:// or https://"):
        load_settings()
    monkeypatch.setenv("BOT_ESCALATION_WEBHOOK", "https://hooks.example.com/voicebot")
    monkeypatch.setenv("BOT_ESCALATION_WEBHOOK_ATTEMPTS", "0")
    with pytest.raises(ConfigError, match="BOT_ESCALATION_WEBHOOK_ATTEMPTS"):
        load_settings()
    monkeypatch.setenv("BOT_ESCALATION_WEBHOOK_ATTEMPTS", "3")
    s = load_settings()
    assert s.escalation_webhook == "https://hooks.example.com/voicebot" and s.escalation_webhook_attempts == 3
