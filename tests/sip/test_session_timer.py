"""Session timers (RFC 4028) and UPDATE (RFC 3311) against our SIP server: a trunk that asks for a session timer
(even one that requires it: a 420 before) gets it; the phone's refreshes (UPDATE or re-INVITE) keep the call, their
absence ends it; when the trunk names us the refresher we send the refreshes (UPDATE when it allows it, else a
re-INVITE); an interval under our minimum gets 422 with Min-SE."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from ops.metrics import ERRORS
from telephony.sip import session_timer
from telephony.sip.message import parse_message
from telephony.sip.uac import SipCaller

from .conftest import RecordingHandler, wait_until


def _msg(*headers: str) -> object:
    head = "\r\n".join(["INVITE sip:bot@h SIP/2.0", "Via: SIP/2.0/UDP 1.2.3.4;branch=z9hG4bK1", "From: <sip:a@h>;tag=1",
                        "To: <sip:bot@h>", "Call-ID: st", "CSeq: 1 INVITE", *headers, "Content-Length: 0"])
    return parse_message((head + "\r\n\r\n").encode())


def test_requested_terms() -> None:
    T = session_timer.Terms
    assert session_timer.requested(_msg()) is None  # type: ignore[arg-type]
    assert session_timer.requested(_msg("Session-Expires: 1800;refresher=uas", "Supported: timer")) == T(1800, "uas")  # type: ignore[arg-type]
    # unnamed: the phone refreshes when it supports timers, otherwise only we can
    assert session_timer.requested(_msg("x: 1800", "k: timer, replaces")) == T(1800, "uac")  # type: ignore[arg-type]
    assert session_timer.requested(_msg("Session-Expires: 1800")) == T(1800, "uas")  # type: ignore[arg-type]
    assert session_timer.requested(_msg("Session-Expires: soon")) is None  # type: ignore[arg-type]
    with pytest.raises(session_timer.IntervalTooSmall):
        session_timer.requested(_msg("Session-Expires: 30", "Supported: timer"))  # type: ignore[arg-type]
    t = T(1800, "uac")
    assert t.header() == "1800;refresher=uac" and t.refresh_after_s() == 900 and t.expire_after_s() == 1768


async def _answered(make_server, sip_settings, prompt_pcm, *extra: tuple[str, str],  # type: ignore[no-untyped-def]
                    follow_moves: bool = False):
    handler = RecordingHandler(prompt_pcm)
    srv = await make_server(handler, sip_settings)
    caller = SipCaller("127.0.0.1", srv.port, follow_moves=follow_moves)
    await caller.open()
    assert await caller.invite(extra=list(extra)) == 200, caller.error
    return srv, caller


async def test_a_call_the_phone_refreshes_lives_and_one_it_stops_refreshing_ends(make_server, sip_settings, prompt_pcm,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_timer, "MIN_SE_S", 2)
    expired = ERRORS.labels("sip", "session_expired")._value.get()
    srv, caller = await _answered(make_server, sip_settings, prompt_pcm, ("Session-Expires", "3;refresher=uac"),
                                  ("Supported", "timer"), ("Require", "timer"))  # required: was a 420
    try:
        ok = caller._ok_response
        assert ok is not None and ok.get("Session-Expires") == "3;refresher=uac", ok.encode()
        assert "timer" in ok.get("Require") and "UPDATE" in ok.get("Allow")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5:  # past the interval: refreshed every second, the call goes on
            resp = await caller.update([("Session-Expires", "3;refresher=uac"), ("Supported", "timer")])
            assert resp is not None and resp.status == 200 and resp.get("Session-Expires") == "3;refresher=uac"
            await asyncio.sleep(1.0)
        assert not caller.ended.is_set()
        # a re-INVITE refreshes as well
        assert await caller.reinvite(extra=[("Session-Expires", "3;refresher=uac")]) == 200
        assert not caller.ended.is_set()
        stopped = time.monotonic()
        await asyncio.wait_for(caller.ended.wait(), 10)  # no refresh any more: the bot ends the call
        assert caller.hangup_by == "bot" and 1.0 <= time.monotonic() - stopped <= 4.0
        assert ERRORS.labels("sip", "session_expired")._value.get() == expired + 1
    finally:
        caller.close()
    # a refresh without Session-Expires turns the timer off (RFC 4028 9): the call is not ended for it
    srv, caller = await _answered(make_server, sip_settings, prompt_pcm, ("Session-Expires", "3;refresher=uac"),
                                  ("Supported", "timer"))
    try:
        assert await caller.reinvite() == 200
        await asyncio.sleep(4.0)
        assert not caller.ended.is_set()
    finally:
        caller.close()


async def test_the_bot_refreshes_when_the_trunk_names_it_refresher(make_server, sip_settings, prompt_pcm,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_timer, "MIN_SE_S", 2)
    srv, caller = await _answered(make_server, sip_settings, prompt_pcm, ("Session-Expires", "2;refresher=uas"),
                                  ("Supported", "timer"), ("Allow", "INVITE, ACK, BYE, CANCEL, UPDATE"))
    try:
        assert caller._ok_response is not None and caller._ok_response.get("Session-Expires") == "2;refresher=uas"
        await wait_until(lambda: len(caller.updates) >= 3, 6)  # UPDATE every second
        assert not caller.reinvites and not caller.ended.is_set()
    finally:
        caller.close()
    # a trunk that does not allow UPDATE gets re-INVITEs offering the session as it is
    srv, caller = await _answered(make_server, sip_settings, prompt_pcm, ("Session-Expires", "2;refresher=uas"),
                                  ("Supported", "timer"))
    try:
        await wait_until(lambda: len(caller.reinvites) >= 2, 6)
        assert not caller.updates and not caller.ended.is_set()
        # refused refreshes end the call (the phone no longer has the session)
        caller.refuse_reinvite = 481
        await asyncio.wait_for(caller.ended.wait(), 6)
        assert caller.hangup_by == "bot"
    finally:
        caller.close()


async def test_a_too_small_interval_gets_422_with_our_minimum(make_server, sip_settings, prompt_pcm) -> None:
    srv = await make_server(RecordingHandler(prompt_pcm), sip_settings)
    caller = SipCaller("127.0.0.1", srv.port)
    await caller.open()
    try:
        assert await caller.invite(extra=[("Session-Expires", "30"), ("Supported", "timer")]) == 422
        assert not srv.calls
    finally:
        caller.close()


async def test_a_call_carried_on_by_another_process_keeps_its_session_timer(make_server, sip_settings, prompt_pcm,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The dialog snapshot keeps the agreed timer: the process that re-INVITEs the phone after a worker died
    offers it again and keeps refreshing (here the trunk named us refresher)."""
    from telephony.sip.resume import resume

    monkeypatch.setattr(session_timer, "MIN_SE_S", 2)
    from tests.sip.test_resume import _die

    a, caller = await _answered(make_server, sip_settings, prompt_pcm, ("Session-Expires", "2;refresher=uas"),
                                ("Supported", "timer"), ("Allow", "INVITE, ACK, BYE, CANCEL, UPDATE"),
                                follow_moves=True)
    try:
        (call,) = a.calls.values()
        await wait_until(lambda: call.established, 5)
        snap = json.loads(json.dumps(call.resume_state()))  # as kept in Redis
        assert snap is not None and snap["timer"] == [2, "uas"], snap
        call._session_clock.cancel()  # the old process is gone: nothing refreshes from there any more
        await _die(a)
        b = await make_server(RecordingHandler(prompt_pcm), sip_settings)
        resumed, why = await resume(b, snap, leg=2)
        assert why == "resumed" and resumed is not None
        assert resumed.session_terms == session_timer.Terms(2, "uas")
        before = len(caller.updates)
        await wait_until(lambda: len(caller.updates) >= before + 2, 6)  # refreshes go on from the new process
        assert not caller.ended.is_set()
    finally:
        caller.close()
