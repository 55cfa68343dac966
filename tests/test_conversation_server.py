"""Conversation behaviour that needs time or failures, against a real `bot serve` subprocess on its
own redis-server: no-input reprompt then goodbye, filler while the engine is slow, apology +
transfer when the engine fails (never silence), and a Redis outage mid-call (escalate, then the
buffered events land once Redis is back)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers.audio import synth
from tests.helpers.bot import call_record, open_policy, place_call, twilio_env, wait_outcome
from tests.helpers.fake_twilio import FakeTwilioApi
from tests.helpers.server import BotServer, free_port, metric_value

pytestmark = pytest.mark.slow
MAX_TURN_S = 4  # the monologue test; every other utterance here is shorter


class PrivateRedis:
    def __init__(self, d: Path) -> None:
        self.port = free_port()
        self.dir = d
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(self.port),
                                      "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "", "--appendonly",
                                      "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.ConnectionError:
                import time

                time.sleep(0.05)
        raise RuntimeError("redis did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    r = PrivateRedis(tmp_path_factory.mktemp("redis-b"))
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def bot(private_redis: PrivateRedis, tmp_path_factory: pytest.TempPathFactory,
        fake_api: FakeTwilioApi) -> Iterator[BotServer]:
    tmp = tmp_path_factory.mktemp("bot-b")
    env = twilio_env(fake_api.url, open_policy(tmp / "policy.yaml"), tmp_path_factory.getbasetemp(),
                     BOT_NO_INPUT_S="1.5", BOT_ENGINE_FACTORY="tests.helpers.slow_engine:make",
                     BOT_TEST_ENGINE_DELAY_S="1.5", BOT_ENGINE_FAULT="understand",
                     BOT_MAX_TURN_S=str(MAX_TURN_S))
    with BotServer(private_redis.url, tmp, env) as server:
        yield server


async def test_no_input_reprompts_then_says_goodbye(bot: BotServer) -> None:
    caller = await place_call(bot.url)
    assert await caller.wait_ended(25)  # silence after the greeting, twice
    await caller.close()
    got = await wait_outcome(bot.redis_url, caller.call_sid)
    assert got["record"]["outcome"] == "no_input"  # not "completed": the dashboard's automation rate
    kinds = [e["kind"] for e in got["events"] if e["type"] == "prompt_heard"]
    assert kinds == ["greeting", "reprompt", "hangup"], kinds
    assert len([e for e in got["events"] if e["type"] == "no_input"]) == 2


async def test_peer_that_never_echoes_marks_still_gets_no_input_handling(bot: BotServer) -> None:
    """Marks are how the bot knows a prompt was heard (and when to start the no-input timer). A peer
    that drops them must not leave a silent caller in dead air until BOT_MAX_CALL_S: once the audio
    should have played out (+ MARK_SLACK_S) the prompt counts as heard, flagged and counted."""
    caller = await place_call(bot.url)

    async def drop_mark(_name: str) -> None:
        return None

    caller._echo_mark = drop_mark  # type: ignore[method-assign]
    assert await caller.wait_ended(40)
    await caller.close()
    got = await wait_outcome(bot.redis_url, caller.call_sid)
    assert got["record"]["outcome"] == "no_input", got["record"]
    heard = [e for e in got["events"] if e["type"] == "prompt_heard"]
    assert [e["kind"] for e in heard] == ["greeting", "reprompt", "hangup"], heard
    assert all(e.get("marks_missing") for e in heard) and not any(e["interrupted"] for e in heard)
    assert metric_value(bot.metrics(), "voicebot_errors_total", {"component": "twilio", "kind": "marks_missing"}) >= 3


async def test_slow_then_failing_engine_gets_filler_then_apology_and_transfer(bot: BotServer,
                                                                             fake_api: FakeTwilioApi) -> None:
    caller = await place_call(bot.url)
    assert await caller.wait_bot_quiet(quiet_s=0.3, timeout_s=15)
    turn = await caller.say(synth("I want to pay my bill"), wait_reply_s=10, quiet_s=0.3)
    assert await caller.wait_ended(20)
    await caller.close()
    # the caller never sat in more than 2 s of silence after speaking: the filler came first
    assert turn.v2v_ms is not None and turn.v2v_ms <= 2000, turn
    got = await wait_outcome(bot.redis_url, caller.call_sid)
    heard = [e["kind"] for e in got["events"] if e["type"] == "prompt_heard"]
    assert heard[:2] == ["greeting", "filler"] and "transfer" in heard, heard
    turns = [e for e in got["events"] if e["type"] == "turn"]
    assert turns[0]["error"] == "engine_error" and turns[0]["decision"]["action"] == "transfer"
    assert turns[0]["decision"]["reason"] == "engine_error"
    assert got["record"]["outcome"] == "transferred"
    assert any(caller.call_sid in r["path"] for r in fake_api.requests)


async def test_redis_outage_mid_call_escalates_and_flushes_later(bot: BotServer, private_redis: PrivateRedis) -> None:
    caller = await place_call(bot.url)
    assert await caller.wait_bot_quiet(quiet_s=0.3, timeout_s=15)
    private_redis.stop()
    try:
        # the next write fails -> the policy is told (RedisFailure) -> apology + transfer
        assert await caller.wait_ended(30)
        await caller.close()
    finally:
        private_redis.start()  # empty again (no persistence): only buffered events will be there
    got = await wait_outcome(bot.redis_url, caller.call_sid, timeout_s=20)
    types = [e["type"] for e in got["events"]]
    assert "state_degraded" in types and "transfer" in types, types
    assert got["record"]["outcome"] == "transferred"
    t = [e for e in got["events"] if e["type"] == "transfer"][0]
    assert t["reason"] == "redis_error"
    logs = bot.logs()
    assert "redis_write_failed" in logs and "state_degraded" in logs
    assert call_record(bot.redis_url, caller.call_sid)["record"]["status"] == "ended"


async def test_a_monologue_longer_than_the_longest_turn_is_answered(bot: BotServer) -> None:
    """A turn cut at BOT_MAX_TURN_S while the caller keeps talking is decided, not cancelled and merged into
    the next piece of speech again and again: with a slow engine (this module's), a caller who never pauses or
    a loud TV in the room left the bot silent until the speech stopped."""
    caller = await place_call(bot.url)
    assert await caller.wait_bot_quiet(quiet_s=0.3, timeout_s=15)
    speech = synth("i have been calling about my bill for three weeks now and every time i call somebody tells me "
                   "something different and i just want somebody to explain to me why the amount went up so much "
                   "this month when i did not change anything at all on my account", rate=180)
    talk_s = len(speech) / 8000
    assert talk_s > 2.5 * MAX_TURN_S
    t0 = time.time()
    talking = asyncio.get_running_loop().create_task(caller.say(speech, wait_reply_s=5, quiet_s=0.3))
    assert await caller.wait_ended(60)  # this module's engine fails: apology and transfer
    talking.cancel()
    await caller.close()
    got = await wait_outcome(bot.redis_url, caller.call_sid)
    turns = [e for e in got["events"] if e["type"] == "turn"]
    # the first cut (at ~4 s + the engine's 1.5 s) was decided while the caller was still talking
    assert turns and turns[0]["t"] - t0 < talk_s - 1.0, (talk_s, [e["t"] - t0 for e in turns])


async def test_a_call_ended_during_an_outage_is_hung_up_over_rest(bot: BotServer, private_redis: PrivateRedis,
                                                                 fake_api: FakeTwilioApi) -> None:
    """During a Redis outage no worker can read that the bot ended a call, and closing its stream makes Twilio ask
    any of them what next: one that cannot tell takes the closed stream for a lost one and gives the caller a new
    stream ("Sorry, we were cut off", up to three times). A call the bot ends while its end cannot be recorded is
    therefore hung up with a REST update to <Hangup/> first. Here: Redis stops, the policy's transfer is refused by
    Twilio, the bot apologizes and hangs up."""
    caller = await place_call(bot.url)
    assert await caller.wait_bot_quiet(quiet_s=0.3, timeout_s=15)
    before = metric_value(bot.metrics(), "voicebot_twilio_rest_hangups_total", {"result": "ok"})
    fake_api.script = [{"status": 400}]  # the transfer: rejected, not retried
    private_redis.stop()
    try:
        assert await caller.wait_ended(40)
        await caller.close()
    finally:
        private_redis.start()
    updates = [r["form"].get("Twiml", "") for r in fake_api.requests if caller.call_sid in r["path"]]
    assert len(updates) == 2 and "<Hangup" not in updates[0] and "<Hangup" in updates[1], updates
    assert metric_value(bot.metrics(), "voicebot_twilio_rest_hangups_total", {"result": "ok"}) == before + 1
    got = await wait_outcome(bot.redis_url, caller.call_sid, timeout_s=20)
    assert got["record"]["outcome"] == "transfer_failed", got["record"]
    assert "hangup_over_rest" in bot.logs()
