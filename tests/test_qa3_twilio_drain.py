"""Twilio calls while a worker drains (rolling deploy, scale-in): the real router and SignatureChecker in-process.

- a call whose TwiML was served before the drain began still gets its stream (Twilio opens it a moment later);
- a new call's webhook is answered 503 + Retry-After (Twilio retries the Fallback URL: a healthy worker), not
  <Reject reason="busy">, logged and counted;
- a stream whose token is not recent (not a call answered moments ago) is refused 1013 and counted;
- the token is keyed from configuration every worker has: a stream landing on another worker is accepted;
- bot.serve waits (bounded) for the streams of answered calls before it stops listening."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlencode
from xml.etree import ElementTree

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from structlog.testing import capture_logs

from ops import metrics
from telephony.twilio import server as twilio_server
from telephony.twilio.bridge import TwilioCallBridge
from telephony.twilio.server import StreamHandshakes, TwilioRouteConfig, make_router
from telephony.twilio.signature import STREAM_TOKEN_PARAM, SignatureChecker
from tests.test_qa_twilio_webhook import FORM, TOKEN, _start, sign

BASE = "http://127.0.0.1:8080"


class Worker:
    """One worker's Twilio routes: its own router state, the deployment's auth token."""

    def __init__(self, token: str = TOKEN) -> None:
        self.calls: list[TwilioCallBridge] = []

        async def on_call(bridge: TwilioCallBridge) -> None:
            self.calls.append(bridge)
            await bridge.hangup("test")

        self.checker = SignatureChecker(token)
        router = make_router(on_call, TwilioRouteConfig(checker=self.checker, rest=None))
        self.handshakes: StreamHandshakes = router.twilio_handshakes  # type: ignore[attr-defined]
        app = FastAPI()
        app.include_router(router)
        self.client = TestClient(app, base_url=BASE)
        self.token = token

    def webhook(self, form: list[tuple[str, str]] = FORM) -> Any:
        headers = {"X-Twilio-Signature": sign(f"{BASE}/twilio/voice", form, key=self.token)} if self.token else {}
        return self.client.post("/twilio/voice", content=urlencode(form),
                                headers={"content-type": "application/x-www-form-urlencoded", **headers})

    def stream(self, call_sid: str, custom: dict[str, str]) -> int | None:
        """Open the stream, send `start`; the close code the worker answers with (None: the call ran)."""
        headers = {"X-Twilio-Signature": sign("wss://testserver/twilio/stream", [], key=self.token)} \
            if self.token else {}
        with self.client.websocket_connect("/twilio/stream", headers=headers) as ws:
            ws.send_json({"event": "connected"})
            ws.send_json(_start(call_sid, custom))
            try:
                msg = ws.receive()
            except WebSocketDisconnect as exc:
                return exc.code
            return msg.get("code") if msg.get("type") == "websocket.close" else None


def _params(resp: Any) -> dict[str, str]:
    stream = ElementTree.fromstring(resp.text).find("./Connect/Stream")
    assert stream is not None, resp.text
    return {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}


def _count(counter: Any, *labels: str) -> float:
    return counter.labels(*labels)._value.get()


def test_a_call_answered_before_the_drain_still_gets_its_stream() -> None:
    w = Worker()
    params = _params(w.webhook())  # Twilio fetched the TwiML ...
    w.handshakes.begin_drain()  # ... SIGTERM ...
    with capture_logs() as logs:
        code = w.stream(FORM[0][1], params)  # ... and opens the stream a moment later
    assert code in (None, 1000), code
    assert [b.info.call_id for b in w.calls] == [FORM[0][1]]  # the call ran: the caller is not dropped
    assert any(e["event"] == "stream_admitted_draining" for e in logs)
    assert w.handshakes.pending() == 0


def test_a_draining_worker_answers_a_new_call_503_with_retry_after_not_busy() -> None:
    w = Worker()
    w.handshakes.begin_drain()
    before = _count(metrics.CALLS_TOTAL, "twilio", "refused_draining")
    with capture_logs() as logs:
        r = w.webhook()
    assert r.status_code == 503, r.text  # Twilio requests the Fallback URL (the load balancer)
    assert int(r.headers["retry-after"]) >= 1
    assert "<Reject" not in r.text and "<Connect" not in r.text
    assert _count(metrics.CALLS_TOTAL, "twilio", "refused_draining") == before + 1
    assert any(e["event"] == "webhook_refused_draining" and e.get("call_id") == FORM[0][1] for e in logs)
    assert w.handshakes.pending() == 0  # refused: no stream to wait for


def test_a_draining_app_answers_503_too() -> None:
    """The app's own drain signal (CallManager draining, worker not ready) gets the same 503."""
    calls: list[Any] = []

    async def on_call(bridge: TwilioCallBridge) -> None:
        calls.append(bridge)

    app = FastAPI()
    app.include_router(make_router(on_call, TwilioRouteConfig(checker=SignatureChecker(TOKEN), rest=None,
                                                              is_draining=lambda: True)))
    client = TestClient(app, base_url=BASE)
    r = client.post("/twilio/voice", content=urlencode(FORM),
                    headers={"content-type": "application/x-www-form-urlencoded",
                             "X-Twilio-Signature": sign(f"{BASE}/twilio/voice", FORM)})
    assert r.status_code == 503 and "retry-after" in r.headers


def test_a_stream_that_is_not_a_recently_answered_call_is_refused_while_draining() -> None:
    w = Worker()
    sid = "CA" + "7" * 32
    old = w.checker.stream_token(sid, now=time.time() - 120)  # valid, unexpired, but not answered moments ago
    w.handshakes.begin_drain()
    before = _count(metrics.ERRORS, "twilio", "stream_refused_draining")
    with capture_logs() as logs:
        code = w.stream(sid, {STREAM_TOKEN_PARAM: old})
    assert code == 1013
    assert w.calls == []
    assert _count(metrics.ERRORS, "twilio", "stream_refused_draining") == before + 1
    assert any(e["event"] == "stream_refused_draining" and e.get("call_id") == sid for e in logs)
    # not draining, the same stream is an ordinary call (the token is still valid)
    w2 = Worker()
    assert w2.stream(sid, {STREAM_TOKEN_PARAM: old}) in (None, 1000)
    assert len(w2.calls) == 1


def test_a_forged_token_is_still_refused_1008_while_draining() -> None:
    w = Worker()
    w.handshakes.begin_drain()
    assert w.stream("CA" + "8" * 32, {STREAM_TOKEN_PARAM: f"{int(time.time()) + 300}.AAAA"}) == 1008
    assert w.calls == []


def test_the_stream_token_is_accepted_by_any_worker_of_the_deployment() -> None:
    """Rolling upgrade / load balancer: TwiML from worker A, stream on worker B (another process, a new version):
    the token is keyed from the auth token both have, never a per-process secret."""
    a, b = Worker(), Worker()
    params = _params(a.webhook())
    assert b.stream(FORM[0][1], params) in (None, 1000)
    assert [c.info.call_id for c in b.calls] == [FORM[0][1]]
    # and while B drains: the call was answered moments ago by A, B takes it
    form2 = [("CallSid", "CA" + "c" * 32), *FORM[1:]]
    params2 = _params(a.webhook(form2))
    b.handshakes.begin_drain()
    assert b.stream(form2[0][1], params2) in (None, 1000)
    assert len(b.calls) == 2
    # a worker with another auth token (another deployment) does not accept it
    c = Worker(token="another-deployments-token")
    assert c.stream(FORM[0][1], params) == 1008


def test_without_signature_checks_only_calls_this_worker_answered_stream_while_draining() -> None:
    w = Worker(token="")
    params = _params(w.webhook())
    w.handshakes.begin_drain()
    assert w.stream(FORM[0][1], params) in (None, 1000)
    assert w.stream("CA" + "9" * 32, {}) == 1013  # nothing says this one was answered
    assert len(w.calls) == 1


async def test_serve_waits_for_answered_calls_streams_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """bot.serve's drain keeps listening until answered calls have opened their stream; not forever."""
    import weakref

    monkeypatch.setattr(twilio_server, "_HANDSHAKES", weakref.WeakSet())  # this process's other test routers
    h = StreamHandshakes()
    twilio_server._HANDSHAKES.add(h)
    try:
        h.answered("CA" + "d" * 32)
        t0 = time.monotonic()
        assert await twilio_server.wait_pending_streams(0.3) == 1  # never came: gives up after the bound
        assert time.monotonic() - t0 < 5
        waiter = asyncio.create_task(twilio_server.wait_pending_streams(30))
        await asyncio.sleep(0.1)
        assert not waiter.done()
        assert h.started("CA" + "d" * 32)
        assert await asyncio.wait_for(waiter, 10) == 0  # returns as soon as the stream started
    finally:
        twilio_server._HANDSHAKES.discard(h)


def _bot_serve(redis_url: str, tmp_path: Any, tmp_path_factory: pytest.TempPathFactory, grace_s: float,
               workers: int = 1) -> Any:
    """A real `bot serve` (Twilio credentials, REST unreachable: no transfer here), its voice cache warm."""
    from tests.helpers.bot import ACCOUNT_SID, AUTH_TOKEN, open_policy
    from tests.helpers.server import BotServer, isolated_redis_url
    from tests.test_serve import _warm_voice_cache

    data = tmp_path_factory.getbasetemp() / "shared-data"
    _warm_voice_cache(data)
    env = {"BOT_SHUTDOWN_GRACE_S": str(grace_s), "BOT_NO_INPUT_S": "60",
           "BOT_POLICY": str(open_policy(tmp_path / "p.yaml")), "BOT_DATA_DIR": str(data),
           "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_API_BASE": "http://127.0.0.1:9"}
    return BotServer(isolated_redis_url(redis_url), tmp_path, env, workers=workers).start()


def _until(cond: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_socket_not_yet_started_holds_the_drain_until_its_start() -> None:
    """Workers share one accept queue: a stream accepted here may be a call another worker answered. Until its
    `start` says which call it is, the drain (bot.serve) must not switch to refusing calls."""
    w = Worker()
    params = _params(w.webhook())
    w.handshakes.begin_drain()
    headers = {"X-Twilio-Signature": sign("wss://testserver/twilio/stream", [])}
    with w.client.websocket_connect("/twilio/stream", headers=headers) as ws:
        ws.send_json({"event": "connected"})
        assert _until(lambda: w.handshakes.opening == 1)
        ws.send_json(_start(FORM[0][1], params))
        assert _until(lambda: w.handshakes.opening == 0)  # handed to the call: counted no more
    assert len(w.calls) == 1
    with w.client.websocket_connect("/twilio/stream", headers=headers) as ws:  # a socket that just goes away
        ws.send_json({"event": "connected"})
        assert _until(lambda: w.handshakes.opening == 1)
    assert _until(lambda: w.handshakes.opening == 0)


def test_pending_handshakes_are_bounded_and_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    h = StreamHandshakes()
    monkeypatch.setattr(twilio_server, "MAX_PENDING_HANDSHAKES", 5)
    for i in range(20):
        h.answered(f"CA{i}")
    assert h.pending() == 5
    monkeypatch.setattr(twilio_server, "HANDSHAKE_WINDOW_S", 0.0)
    time.sleep(0.01)
    assert h.pending() == 0  # callers who hung up before the stream came hold the drain no longer


@pytest.mark.slow
async def test_sigterm_between_twiml_and_stream_keeps_the_answered_call(
        redis_url: str, tmp_path: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """`bot serve` for real: TwiML served, SIGTERM, then the stream opens. The answered caller gets the bot (not
    silence and a drop); meanwhile a new call's webhook is 503 + Retry-After and /readyz is 503."""
    import signal

    import httpx

    from bot.simulator import TwilioCaller
    from tests.helpers.bot import ACCOUNT_SID, AUTH_TOKEN, wait_outcome
    from tests.helpers.server import metric_value

    server = _bot_serve(redis_url, tmp_path, tmp_path_factory, grace_s=20)
    try:
        caller = TwilioCaller(server.url, AUTH_TOKEN, account_sid=ACCOUNT_SID)
        async with httpx.AsyncClient(timeout=10) as client:
            twiml = await caller.webhook(client)  # Twilio fetched the TwiML ...
            assert twiml.status_code == 200, twiml.text
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)  # ... the deploy stops this worker ...
            await asyncio.sleep(0.5)
            late = TwilioCaller(server.url, AUTH_TOKEN, account_sid=ACCOUNT_SID)
            refused = await late.webhook(client)  # a new call: elsewhere, please
            ready = await client.get(f"{server.url}/readyz")

        async def replay(_client: Any, signature: str | None = None) -> Any:
            return twiml  # the TwiML fetched before the signal

        caller.webhook = replay  # type: ignore[method-assign]
        await caller.connect()  # ... and the stream opens a moment later
        assert refused.status_code == 503 and refused.headers.get("retry-after"), refused.text
        assert ready.status_code == 503 and ready.json()["draining"] is True, ready.text
        assert await caller.wait_bot_quiet(quiet_s=0.3, timeout_s=20)  # the greeting: the call is live
        assert not caller.ended
        await caller.hangup()
        await caller.close()
        rc = await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 40)
        assert rc == 0, server.logs()[-3000:]
        rec = await wait_outcome(server.redis_url, caller.call_sid, 5)
        assert rec["record"].get("outcome") == "caller_hangup", rec["record"]
        assert "webhook_refused_draining" in server.logs()
    finally:
        server.stop()


@pytest.mark.slow
async def test_sigterm_to_a_two_worker_supervisor_keeps_answered_calls(
        redis_url: str, tmp_path: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """`bot serve --workers 2` (one shared listening socket): whichever worker served the TwiML keeps listening
    until the stream came, so calls answered just before the SIGTERM all go on."""
    import signal

    import httpx

    from bot.simulator import TwilioCaller
    from tests.helpers.bot import ACCOUNT_SID, AUTH_TOKEN, wait_outcome

    server = _bot_serve(redis_url, tmp_path, tmp_path_factory, grace_s=20, workers=2)
    try:
        callers = [TwilioCaller(server.url, AUTH_TOKEN, account_sid=ACCOUNT_SID) for _ in range(4)]
        async with httpx.AsyncClient(timeout=10) as client:
            answers = [await c.webhook(client) for c in callers]  # spread over both workers by the accept queue
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        for c, a in zip(callers, answers):
            async def replay(_client: Any, signature: str | None = None, _a: Any = a) -> Any:
                return _a

            c.webhook = replay  # type: ignore[method-assign]
            await c.connect()
        greeted = await asyncio.gather(*(c.wait_bot_quiet(quiet_s=0.3, timeout_s=30) for c in callers))
        assert all(greeted) and all(c.play.played_samples > 0 for c in callers), greeted  # every call is live
        assert not any(c.ended for c in callers)
        for c in callers:
            await c.hangup()
            await c.close()
        rc = await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 40)
        assert rc == 0, server.logs()[-3000:]
        for c in callers:
            rec = await wait_outcome(server.redis_url, c.call_sid, 5)
            assert rec["record"].get("outcome") == "caller_hangup", (c.call_sid, rec["record"])
    finally:
        server.stop()


@pytest.mark.slow
async def test_a_stream_that_starts_after_the_wait_for_streams_still_gets_the_bot(
        redis_url: str, tmp_path: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The stream of a call answered before the SIGTERM connects, but its `start` comes only after bot.serve's
    wait for streams (STREAM_WAIT_S) while another call keeps the worker up: the call joins the drain (greeted,
    live) instead of a hang-up in silence."""
    import signal

    from bot.serve import STREAM_WAIT_S
    from bot.simulator import TwilioCaller
    from tests.helpers.bot import ACCOUNT_SID, AUTH_TOKEN, place_call, wait_outcome

    server = _bot_serve(redis_url, tmp_path, tmp_path_factory, grace_s=25)
    try:
        live = await place_call(server.url)  # a call in progress: the worker drains it for the grace
        assert await live.wait_bot_quiet(quiet_s=0.3, timeout_s=30)
        caller = TwilioCaller(server.url, AUTH_TOKEN, account_sid=ACCOUNT_SID)
        import httpx

        async with httpx.AsyncClient(timeout=10) as client:
            answer = await caller.webhook(client)
        assert answer.status_code == 200, answer.text

        async def replay(_client: Any, signature: str | None = None) -> Any:
            return answer

        caller.webhook = replay  # type: ignore[method-assign]
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        await caller.connect(start_delay_s=STREAM_WAIT_S + 1.5)
        assert await caller.wait_bot_quiet(quiet_s=0.3, timeout_s=20)
        assert caller.play.played_samples > 8000 and not caller.ended  # greeted, not hung up on
        for c in (caller, live):
            await c.hangup()
            await c.close()
        rc = await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 40)
        assert rc == 0, server.logs()[-3000:]
        rec = await wait_outcome(server.redis_url, caller.call_sid, 5)
        assert rec["record"].get("outcome") == "caller_hangup", rec["record"]
        assert "call_admitted_draining" in server.logs() and "call_refused_draining" not in server.logs()
    finally:
        server.stop()
