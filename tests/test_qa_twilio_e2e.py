"""Twilio REST transfer failures end to end: a real `bot serve` and Redis, the simulated caller, the local
Twilio REST fake answering as Twilio does when the credentials are wrong, when it rate-limits, and when the
caller hangs up while the transfer request is in flight."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Iterator

import pytest

from tests.helpers.bot import ACCOUNT_SID, AUTH_TOKEN, open_policy, place_call, twilio_env, wait_outcome
from tests.helpers.fake_twilio import FakeTwilioApi
from tests.helpers.server import BotServer, isolated_redis_url, metric_value

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bot(redis_url: str, tmp_path_factory: pytest.TempPathFactory, fake_api: FakeTwilioApi) -> Iterator[BotServer]:
    tmp = tmp_path_factory.mktemp("bot-qa-twilio")
    env = twilio_env(fake_api.url, open_policy(tmp / "policy.yaml"), tmp_path_factory.getbasetemp())
    server = BotServer(isolated_redis_url(redis_url), tmp, env)
    server.start(timeout_s=300)  # the shared box can be slow to pre-render the prompts
    try:
        yield server
    finally:
        server.stop()


async def _ask_for_agent(bot: BotServer):  # type: ignore[no-untyped-def]
    caller = await place_call(bot.url)
    assert await caller.wait_bot_quiet(quiet_s=0.3, timeout_s=20)
    await caller.send_dtmf("0")  # the policy's keypad option 0: speak_to_agent
    return caller


async def test_bad_twilio_credentials_give_the_caller_an_apology(bot: BotServer, fake_api: FakeTwilioApi) -> None:
    fake_api.auth_token = "rotated-token"  # the token in the bot's environment no longer works
    try:
        caller = await _ask_for_agent(bot)
        assert await caller.wait_ended(30)
        await caller.close()
    finally:
        fake_api.auth_token = AUTH_TOKEN
    got = await wait_outcome(bot.redis_url, caller.call_sid)
    assert got["record"]["outcome"] == "transfer_failed", got["record"]
    said = [e for e in got["events"] if e["type"] == "prompt_heard" and e["kind"] == "transfer_failed"]
    assert said and said[0]["heard_ms"] > 0  # the caller was told, not dropped
    reqs = [r for r in fake_api.requests if caller.call_sid in r["path"]]
    assert len(reqs) == 1  # bad credentials are not retried
    m = bot.metrics()
    assert metric_value(m, "voicebot_errors_total", {"component": "twilio", "kind": "transfer_auth_failed"}) >= 1
    assert metric_value(m, "voicebot_transfers_total", {"transport": "twilio", "result": "failed"}) >= 1
    line = next(json.loads(x) for x in bot.logs().splitlines()
                if '"transfer_failed"' in x and caller.call_sid in x and "twilio_code" in x)
    assert line["call_id"] == caller.call_sid and line["twilio_code"] == 20003 and line["status"] == 401


async def test_rate_limited_transfer_is_retried_after_retry_after(bot: BotServer, fake_api: FakeTwilioApi) -> None:
    fake_api.script = [{"status": 429, "headers": {"Retry-After": "1"}}]
    try:
        caller = await _ask_for_agent(bot)
        assert await caller.wait_ended(30)
        await caller.close()
    finally:
        fake_api.script = []
    got = await wait_outcome(bot.redis_url, caller.call_sid)
    assert got["record"]["outcome"] == "transferred", got["record"]
    reqs = [r for r in fake_api.requests if caller.call_sid in r["path"]]
    assert len(reqs) == 2 and reqs[1]["t"] - reqs[0]["t"] >= 0.9
    assert "<Enqueue" in reqs[1]["form"]["Twiml"] and "transfer-status" in reqs[1]["form"]["Twiml"]


async def test_caller_hanging_up_during_a_failing_transfer_is_not_retried(bot: BotServer,
                                                                          fake_api: FakeTwilioApi) -> None:
    """Twilio is briefly unavailable (503) and the caller hangs up meanwhile: the bot does not keep
    redirecting a call that is over, and the call ends as the caller's hang-up."""
    caller = await place_call(bot.url)
    loop = asyncio.get_running_loop()

    def hang_up_first(call_sid: str) -> None:
        if call_sid == caller.call_sid:
            asyncio.run_coroutine_threadsafe(caller.hangup(), loop).result(5)
            time.sleep(0.3)

    fake_api.before_update = hang_up_first
    fake_api.script = [503, 503]
    try:
        assert await caller.wait_bot_quiet(quiet_s=0.3, timeout_s=20)
        await caller.send_dtmf("0")
        assert await caller.wait_ended(30)
        got = await wait_outcome(bot.redis_url, caller.call_sid)
    finally:
        fake_api.before_update = None
        fake_api.script = []
    await asyncio.sleep(1.5)  # a retry would have come by now
    assert len([r for r in fake_api.requests if caller.call_sid in r["path"]]) == 1
    assert got["record"]["outcome"] != "transferred", got["record"]
    m = bot.metrics()
    assert metric_value(m, "voicebot_transfers_total", {"transport": "twilio", "result": "caller_hangup"}) >= 1


async def test_twilio_report_of_an_unanswered_transfer_lands_in_the_call_story(bot: BotServer,
                                                                              fake_api: FakeTwilioApi) -> None:
    """After the redirect Twilio runs the <Enqueue>/<Dial>; when it ends it posts the result to the action URL.
    No agent: the caller hears an apology (not dead air) and the call's events say the agent was not reached."""
    import httpx
    from twilio.request_validator import RequestValidator

    caller = await _ask_for_agent(bot)
    assert await caller.wait_ended(30)
    await caller.close()
    assert (await wait_outcome(bot.redis_url, caller.call_sid))["record"]["outcome"] == "transferred"
    url = f"{bot.url}/twilio/transfer-status"
    form = {"CallSid": caller.call_sid, "AccountSid": ACCOUNT_SID, "QueueResult": "queue-full"}
    sig = RequestValidator(AUTH_TOKEN).compute_signature(url, form)
    async with httpx.AsyncClient() as client:
        resp = await client.post(url, data=form, headers={"X-Twilio-Signature": sig})
    assert resp.status_code == 200 and "<Say" in resp.text and "<Hangup" in resp.text
    deadline = time.monotonic() + 10
    while True:
        got = await wait_outcome(bot.redis_url, caller.call_sid)
        outcome = [e for e in got["events"] if e["type"] == "transfer_outcome"]
        if outcome or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert outcome and outcome[0]["status"] == "queue-full" and outcome[0]["reached_agent"] is False
