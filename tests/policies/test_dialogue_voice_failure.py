"""Hand-offs a caller must never miss, against a real `bot serve` (real engine, real Redis, the local fake
Twilio REST API):
- the voice fails on a question the caller must answer: the caller is apologised to and transferred, never
  left in silence. The engine is the real one whose voice refuses any payment read-back (rendered on the fly,
  never cached), loaded by the server through BOT_ENGINE_FACTORY=tests.policies.test_dialogue_voice_failure:make;
- a callback accepted (the agents' queue closed) leaves the people who call back the hand-off context."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import numpy as np
import pytest
import yaml

from tests.helpers.audio import synth
from tests.helpers.bot import open_policy, place_call, twilio_env, wait_outcome
from tests.helpers.fake_twilio import FakeTwilioApi
from tests.helpers.server import BotServer

pytestmark = pytest.mark.slow

BROKEN = "payment of"  # in the read-back ("That's a payment of 40 dollars, is that right?") only


class VoiceFailsOnReadBack:
    """The real engine; speaking a text that contains BROKEN raises, as a failed voice would."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def speak(self, text: str, style: Any = None) -> np.ndarray:
        if BROKEN in text:
            raise RuntimeError("voice failed (test)")
        return await self.inner.speak(text, style)

    async def speak_stream(self, text: str, style: Any = None) -> AsyncIterator[np.ndarray]:
        if BROKEN in text:
            raise RuntimeError("voice failed (test)")
        async for chunk in self.inner.speak_stream(text, style):
            yield chunk


def make() -> VoiceFailsOnReadBack:
    from engine.runtime import Engine

    return VoiceFailsOnReadBack(Engine.load())


@pytest.fixture(scope="module")
def bot(redis_url: str, tmp_path_factory: pytest.TempPathFactory, fake_api: FakeTwilioApi) -> Iterator[BotServer]:
    tmp: Path = tmp_path_factory.mktemp("bot-voice-failure")
    policy = open_policy(tmp / "policy.yaml")  # every queue open around the clock, then:
    doc = yaml.safe_load(policy.read_text())
    # the agents' queue never open (a callback is offered); system errors go to the always-open repair desk
    doc["queues"]["general"]["hours"] = {"timezone": "UTC", "weekly": {}}
    doc["queues"]["general"]["out_of_hours"] = {"action": "callback", "prompt": "callback_offer"}
    doc["escalation"]["system_error"]["queue"] = "repair"
    policy.write_text(yaml.safe_dump(doc, sort_keys=False))
    # BOT_NO_INPUT_S stays at twilio_env's 60 s: the test must not pass merely because silence ended the call
    env = twilio_env(fake_api.url, policy, tmp_path_factory.getbasetemp(),
                     BOT_ENGINE_FACTORY="tests.policies.test_dialogue_voice_failure:make")
    server = BotServer(redis_url, tmp, env)
    try:
        # its own voice cache: every prompt is rendered at start, slow on a busy 2-core box
        yield server.start(timeout_s=300)
    finally:
        server.stop()


async def test_voice_failing_on_a_question_transfers_instead_of_dead_air(bot: BotServer,
                                                                         fake_api: FakeTwilioApi) -> None:
    caller = await place_call(bot.url)
    assert await caller.wait_bot_quiet(quiet_s=0.5, timeout_s=20)
    await caller.say(synth("I'd like to pay forty dollars"), wait_reply_s=15, quiet_s=0.8)
    ended = await caller.wait_ended(30)
    if not ended:
        await caller.hangup()
    else:
        await caller.close()
    got = await wait_outcome(bot.redis_url, caller.call_sid, 20)
    turns = [e for e in got["events"] if e["type"] == "turn"]
    summary = [(t.get("intent"), t["decision"]["action"], t["decision"]["reason"]) for t in turns]
    assert turns and turns[0]["decision"]["reason"] == "read_back", summary  # the question the voice refused
    assert ended, f"the caller was left in silence after the voice failed: {summary}"
    assert [e["kind"] for e in got["events"] if e["type"] == "voice_failed"] == ["confirm"]
    transfer = [e for e in got["events"] if e["type"] == "transfer"]
    assert len(transfer) == 1 and transfer[0]["reason"] == "engine_error", transfer
    # the human agent still learns what the caller wanted
    assert transfer[0]["context"]["intent"] == "pay_bill" and transfer[0]["context"]["slots"].get("amount")
    assert got["record"]["outcome"] == "transferred"
    assert any(caller.call_sid in r["path"] for r in fake_api.requests)
    heard = [e["kind"] for e in got["events"] if e["type"] == "prompt_heard"]
    assert heard[0] == "greeting" and "transfer" in heard, heard


async def test_a_callback_accepted_leaves_the_hand_off_context(bot: BotServer) -> None:
    caller = await place_call(bot.url)
    assert await caller.wait_bot_quiet(quiet_s=0.5, timeout_s=20)
    await caller.say(synth("I want to speak to someone"), wait_reply_s=15, quiet_s=0.8)
    if not caller.ended:
        await caller.say(synth("yes"), wait_reply_s=15, quiet_s=0.8)
    ended = await caller.wait_ended(20)
    if not ended:
        await caller.hangup()
    else:
        await caller.close()
    got = await wait_outcome(bot.redis_url, caller.call_sid, 20)
    turns = [(e.get("intent"), e["decision"]["action"], e["decision"]["reason"]) for e in got["events"]
             if e["type"] == "turn"]
    assert got["record"]["outcome"] == "callback", turns
    ctx = json.loads(got["record"]["handoff"])
    assert ctx["callback"] is True and ctx["reason"] == "callback" and ctx["queue"] == "general", ctx
    assert ctx["intent"] == "speak_to_agent" and ctx["caller"] and len(ctx["transcript"]) == 2, ctx
    assert got["record"]["callback_queue"] == "general"
    assert [e["queue"] for e in got["events"] if e["type"] == "callback"] == ["general"]
