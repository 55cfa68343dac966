"""Twilio REST transfers against the local wire-format fake (tests/helpers/fake_twilio.py): every failure
mode is classified, counted and logged, retried only when Twilio cannot have moved the call (or the stream
is still up), never once the caller is gone, and always within the conversation's 10 s cap."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Iterator
from xml.etree import ElementTree

import pytest

from ops import metrics
from tests.conftest import free_port
from tests.helpers.bot import ACCOUNT_SID, AUTH_TOKEN
from tests.helpers.fake_twilio import FakeTwilioApi
from telephony.twilio import protocol, twiml
from telephony.twilio.bridge import TwilioCallBridge
from telephony.twilio.rest import TwilioConfigError, TwilioRest

CALL = "CA" + "a" * 32
SUB = "AC" + "5" * 32


@pytest.fixture()
def api() -> Iterator[FakeTwilioApi]:
    with FakeTwilioApi(ACCOUNT_SID, AUTH_TOKEN) as fake:
        yield fake


def _rest(api: FakeTwilioApi, **kw: float) -> TwilioRest:
    return TwilioRest(api.url, ACCOUNT_SID, AUTH_TOKEN, **{"backoff_s": 0.05, **kw})  # type: ignore[arg-type]


def _updates(api: FakeTwilioApi) -> list[dict]:
    return [r for r in api.requests if "/Calls/" in r["path"]]


async def test_bad_credentials_fail_at_once_with_twilios_code(api: FakeTwilioApi) -> None:
    rest = TwilioRest(api.url, ACCOUNT_SID, "wrong-token", backoff_s=0.05)
    res = await rest.transfer(CALL, "billing")
    await rest.aclose()
    assert (res.result, res.status, res.code, res.attempts) == ("auth_failed", 401, 20003, 1)
    assert len(_updates(api)) == 1  # a credentials problem is not retried


async def test_a_call_already_over_is_call_gone_not_retried(api: FakeTwilioApi) -> None:
    api.completed.add(CALL)
    rest = _rest(api)
    res = await rest.transfer(CALL, "billing")
    assert (res.result, res.code, res.attempts) == ("call_gone", 21220, 1)
    res = await rest.transfer(CALL, "billing", account_sid="AC" + "9" * 32)  # not an account of ours: 404
    assert (res.result, res.status) == ("call_gone", 404)
    await rest.aclose()


async def test_429_honours_retry_after_and_503_is_retried(api: FakeTwilioApi) -> None:
    rest = _rest(api)
    api.script = [{"status": 429, "headers": {"Retry-After": "1"}}]
    t0 = time.monotonic()
    res = await rest.transfer(CALL, "billing")
    waited = time.monotonic() - t0
    assert res.ok and res.attempts == 2 and waited >= 0.9, (res, waited)
    reqs = _updates(api)
    assert reqs[1]["t"] - reqs[0]["t"] >= 0.9  # not before Twilio said so
    api.script = [503, 503]
    res = await rest.transfer(CALL, "billing")
    assert res.ok and res.attempts == 3
    # a Retry-After beyond what a caller on the line can wait: give up now, not after the conversation's cap
    api.script = [{"status": 429, "headers": {"Retry-After": "60"}}]
    t0 = time.monotonic()
    res = await rest.transfer(CALL, "billing")
    assert (res.result, res.attempts) == ("rate_limited", 1) and time.monotonic() - t0 < 5
    await rest.aclose()


async def test_ambiguous_failures_are_retried_only_while_the_stream_is_up(api: FakeTwilioApi) -> None:
    """A 500 or a timeout may have moved the call: retrying would re-enqueue the caller. A redirect that took
    effect stops the stream, so a retry is safe only while it is still up."""
    # a timeout well clear of connecting on a loaded 2-core box (0.5 s once read as "unreachable": the connect
    # itself timed out), and a reply delayed well past it
    rest = _rest(api, timeout_s=1.0)
    api.script = [500]
    res = await rest.transfer(CALL, "billing", still_live=lambda: False)
    assert (res.result, res.status, res.attempts) == ("server_error", 500, 1)
    api.script = [500]
    res = await rest.transfer(CALL, "billing", still_live=lambda: True)
    assert res.ok and res.attempts == 2
    api.script = [{"status": 200, "delay_s": 3.0}]
    res = await rest.transfer(CALL, "billing", still_live=lambda: False)
    assert (res.result, res.attempts) == ("timeout", 1)
    api.script = [{"status": 200, "drop": True}]
    res = await rest.transfer(CALL, "billing", still_live=lambda: False)
    assert (res.result, res.attempts) == ("dropped", 1)
    await rest.aclose()


async def test_connection_refused_is_retried_within_the_budget() -> None:
    rest = TwilioRest(f"http://127.0.0.1:{free_port()}", ACCOUNT_SID, AUTH_TOKEN, backoff_s=0.05, budget_s=3.0)
    t0 = time.monotonic()
    res = await rest.transfer(CALL, "billing")
    await rest.aclose()
    assert (res.result, res.attempts) == ("unreachable", 3) and time.monotonic() - t0 < 3.5


async def test_total_time_stays_under_the_conversations_cap(api: FakeTwilioApi) -> None:
    """Slow answers on every attempt: the transfer gives its answer within its budget (8 s), before the
    conversation's 10 s wait_for would cancel it and lose the reason."""
    rest = TwilioRest(api.url, ACCOUNT_SID, AUTH_TOKEN, timeout_s=5.0, backoff_s=0.05)
    api.script = [{"status": 200, "delay_s": 6}] * 3
    t0 = time.monotonic()
    res = await rest.transfer(CALL, "billing", still_live=lambda: True)
    took = time.monotonic() - t0
    await rest.aclose()
    assert res.result == "timeout" and took < 9.5, (res, took)


async def test_parent_credentials_move_a_subaccount_call_and_api_keys_work(api: FakeTwilioApi) -> None:
    api.accounts.add(SUB)
    rest = _rest(api)
    res = await rest.transfer(CALL, "billing", account_sid=SUB)  # the stream's start names the subaccount
    await rest.aclose()
    assert res.ok
    req = _updates(api)[-1]
    assert req["path"] == f"/2010-04-01/Accounts/{SUB}/Calls/{CALL}.json" and req["auth_ok"]
    key = TwilioRest(api.url, ACCOUNT_SID, "", api_key="SK" + "1" * 32, api_secret="s3cret")
    await key.transfer(CALL, "billing")
    await key.aclose()
    assert _updates(api)[-1]["auth"] == "Basic " + base64.b64encode(f"{'SK' + '1' * 32}:s3cret".encode()).decode()


def test_settings_that_can_never_work_fail_at_start() -> None:
    for kw in ({"api_base": "api.twilio.com"}, {"api_base": "ftp://x"}, {"api_base": ""}):
        with pytest.raises(TwilioConfigError, match="TWILIO_API_BASE"):
            TwilioRest(kw["api_base"], ACCOUNT_SID, AUTH_TOKEN)
    with pytest.raises(TwilioConfigError, match="TWILIO_API_SECRET"):
        TwilioRest("https://api.twilio.com", ACCOUNT_SID, "", api_key="SK1")
    # a region/edge is just another base URL
    assert TwilioRest("https://api.dublin.ie1.twilio.com/", ACCOUNT_SID, AUTH_TOKEN).api_base \
        == "https://api.dublin.ie1.twilio.com"


async def test_no_account_sid_anywhere_is_a_clear_per_call_error(api: FakeTwilioApi) -> None:
    rest = TwilioRest(api.url, "", AUTH_TOKEN)
    res = await rest.transfer(CALL, "billing", account_sid="")
    await rest.aclose()
    assert res.result == "unconfigured" and "TWILIO_ACCOUNT_SID" in res.message and not _updates(api)


# ---- the bridge: what the conversation and the metrics see ----

class Wire:
    async def send(self, text: str) -> None:
        pass

    async def close(self, code: int) -> None:
        pass


def _bridge(rest: TwilioRest | None, account: str = ACCOUNT_SID,
            dial: twiml.DialOptions | None = None) -> TwilioCallBridge:
    w = Wire()
    return TwilioCallBridge(protocol.StartInfo("MZ1", CALL, account, {}), w.send, w.close, rest, dial=dial)


def _count(counter: object, *labels: str) -> float:
    return counter.labels(*labels)._value.get()  # type: ignore[attr-defined]


async def test_bridge_counts_each_failure_by_cause(api: FakeTwilioApi) -> None:
    rest = TwilioRest(api.url, ACCOUNT_SID, "wrong-token")
    b = _bridge(rest)
    before = (_count(metrics.TRANSFERS, "twilio", "qa_q", "failed"), _count(metrics.ERRORS, "twilio", "transfer_auth_failed"))
    assert await b.transfer("qa_q", {}) is False
    assert _count(metrics.TRANSFERS, "twilio", "qa_q", "failed") == before[0] + 1
    assert _count(metrics.ERRORS, "twilio", "transfer_auth_failed") == before[1] + 1
    await rest.aclose()
    unconf = _count(metrics.ERRORS, "twilio", "transfer_unconfigured")
    assert await _bridge(None).transfer("qa_q", {}) is False
    assert _count(metrics.ERRORS, "twilio", "transfer_unconfigured") == unconf + 1


async def test_caller_hanging_up_while_the_transfer_is_in_flight_stops_the_retries(api: FakeTwilioApi) -> None:
    rest = _rest(api)
    b = _bridge(rest)
    api.script = [{"status": 503, "delay_s": 0.5}, 200]
    before = _count(metrics.TRANSFERS, "twilio", "qa_hup", "caller_hangup")
    task = asyncio.ensure_future(b.transfer("qa_hup", {}))
    await asyncio.sleep(0.2)
    b.end("stream_stopped")  # the caller hung up while the request was in flight
    assert await task is False
    assert len(_updates(api)) == 1  # not retried: nobody left to move
    assert _count(metrics.TRANSFERS, "twilio", "qa_hup", "caller_hangup") == before + 1
    await rest.aclose()


async def test_dial_transfer_carries_caller_id_ring_time_and_an_action_for_no_answer(api: FakeTwilioApi) -> None:
    rest = _rest(api)
    dial = twiml.DialOptions(action_url="https://bot.example.com/twilio/transfer-status?x=1&y=2",
                             caller_id="+15550009999", timeout_s=20)
    b = _bridge(rest, dial=dial)
    assert await b.transfer("+15550001111", {})
    doc = ElementTree.fromstring(_updates(api)[-1]["form"]["Twiml"])
    d = doc.find("Dial")
    assert d is not None and d.text == "+15550001111"
    assert (d.get("callerId"), d.get("timeout"), d.get("action"), d.get("method")) == (
        "+15550009999", "20", "https://bot.example.com/twilio/transfer-status?x=1&y=2", "POST")
    assert await b.transfer("billing & <co>", {})  # queue names are escaped, the document stays valid
    q = ElementTree.fromstring(_updates(api)[-1]["form"]["Twiml"]).find("Enqueue")
    assert q is not None and q.text == "billing & <co>" and q.get("action") == dial.action_url
    await rest.aclose()
    with pytest.raises(ValueError):
        twiml.transfer("  ")


def test_transfer_outcome_twiml() -> None:
    sorry = ElementTree.fromstring(twiml.transfer_outcome(apologize=True))
    assert [c.tag for c in sorry] == ["Say", "Hangup"]
    assert [c.tag for c in ElementTree.fromstring(twiml.transfer_outcome(apologize=False))] == ["Hangup"]
