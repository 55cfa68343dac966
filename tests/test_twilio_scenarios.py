"""End-to-end policy scenarios over Twilio with the TRAINED engine: a real `bot serve`, a real Redis,
caller speech synthesized with espeak-ng through a phone channel, the local Twilio REST fake.

- a confident request is answered (and the call's events and the metrics show it);
- a mid-confidence request is confirmed, "yes", then answered;
- an unintelligible caller is reprompted, then escalated to a human;
- "agent" is transferred at once (the REST redirect is visible at the fake Twilio API);
- a payment amount is read back before it is taken: "no" asks for it again, the new amount is read back,
  "yes" takes exactly the amount that was read back.

The thresholds of the test policy put the chosen requests in the band each scenario needs
(the policy defines the bands; the engine's calibrated confidence is what it is)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import yaml

from tests.helpers.audio import synth
from tests.helpers.bot import open_policy, place_call, twilio_env, wait_outcome
from tests.helpers.fake_twilio import FakeTwilioApi
from tests.helpers.server import BotServer, isolated_redis_url, metric_value

pytestmark = pytest.mark.slow


def scenario_policy(path: Path) -> Path:
    open_policy(path)
    doc = yaml.safe_load(path.read_text())
    th = doc.setdefault("thresholds", {})
    ov = th.setdefault("overrides", {})
    ov["report_outage"] = {"accept": 1.0, "confirm": 0.3}  # the mid band: always confirmed first
    ov["check_balance"] = {"accept": 0.6}  # the confident band
    ov["speak_to_agent"] = {"accept": 0.25, "confirm": 0.2}  # "agent" goes straight through
    ov["pay_bill"] = {"accept": 0.6}  # the read-back scenario starts from an accepted request
    doc["escalation"]["max_failures"]["count"] = 2  # second failed turn -> a human
    # espeak's flat robot voice can score as "frustrated"; frustration routing is not under test here
    doc["escalation"]["frustration"]["threshold"] = 0.99
    doc["dtmf"]["enabled"] = False
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    from policies.schema import parse_policy

    parse_policy(path.read_text())
    return path


@pytest.fixture(scope="module")
def bot(redis_url: str, tmp_path_factory: pytest.TempPathFactory, fake_api: FakeTwilioApi) -> Iterator[BotServer]:
    tmp = tmp_path_factory.mktemp("bot-scen")
    env = twilio_env(fake_api.url, scenario_policy(tmp / "policy.yaml"), tmp_path_factory.getbasetemp())
    server = BotServer(isolated_redis_url(redis_url), tmp, env)
    server.start(timeout_s=300)  # pre-rendering the prompts can take minutes on the loaded shared box
    try:
        if not httpx.get(f"{server.url}/readyz").json().get("understanding"):
            pytest.skip("no trained understanding model installed (engine.understanding)")
        yield server
    finally:
        server.stop()


async def _converse(bot: BotServer, turns: list[np.ndarray]) -> tuple[Any, dict[str, Any]]:
    caller = await place_call(bot.url)
    assert await caller.wait_bot_quiet(quiet_s=0.5, timeout_s=20)
    for pcm in turns:
        if caller.ended:
            break
        await caller.say(pcm, wait_reply_s=15, quiet_s=0.8)
    if not caller.ended:
        await caller.hangup()
    else:
        await caller.close()
    return caller, await wait_outcome(bot.redis_url, caller.call_sid, 20)


def _turns(got: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in got["events"] if e["type"] == "turn"]


async def test_policy_scenarios_over_twilio(bot: BotServer, fake_api: FakeTwilioApi) -> None:
    before = bot.metrics()
    gibberish = synth("the quick brown fox jumps over the lazy dog")[::-1]  # reversed: speech-like, meaningless
    results = await asyncio.gather(
        _converse(bot, [synth("how much do I owe")]),
        _converse(bot, [synth("my internet is down"), synth("yes")]),
        _converse(bot, [gibberish, gibberish]),
        _converse(bot, [synth("I want to speak to someone")]),
        _converse(bot, [synth("I'd like to pay forty dollars"), synth("no"), synth("twenty five dollars"), synth("yes")]),
    )
    (c1, confident), (c2, confirm), (c3, unclear), (c4, agent), (_, payment) = results
    summary = [[(x["intent"], x["confidence"], x["decision"]["action"], x["decision"]["reason"], x["caller_state"])
                for x in _turns(got)] for _, got in results]
    print("scenario turns:", summary)

    t = _turns(confident)
    assert t[0]["intent"] == "check_balance" and t[0]["decision"]["action"] == "answer", summary
    assert t[0]["decision"]["reason"] == "accepted" and c1.result.turns[0].v2v_ms is not None
    assert confident["record"]["outcome"] == "caller_hangup"

    t = _turns(confirm)
    assert [x["decision"]["action"] for x in t] == ["confirm", "answer"], t
    assert t[0]["intent"] == "report_outage" and t[1]["decision"]["reason"] == "confirmed"

    t = _turns(unclear)
    assert t[0]["decision"]["action"] == "reprompt", t[0]
    assert t[0]["decision"]["reason"] in ("low_confidence", "out_of_scope", "no_context"), t[0]
    assert t[1]["decision"]["action"] == "transfer" and t[1]["decision"]["reason"] == "max_failures", t[1]
    assert unclear["record"]["outcome"] == "transferred"

    t = _turns(agent)
    assert len(t) == 1 and t[0]["intent"] == "speak_to_agent" and t[0]["decision"]["action"] == "transfer", t
    assert agent["record"]["outcome"] == "transferred"
    for c in (c3, c4):
        reqs = [r for r in fake_api.requests if c.call_sid in r["path"]]
        assert len(reqs) == 1 and reqs[0]["auth_ok"] and "<Enqueue " in reqs[0]["form"]["Twiml"]  # with its action URL

    t = _turns(payment)
    assert [(x["decision"]["action"], x["decision"]["reason"]) for x in t] == [
        ("confirm", "read_back"), ("collect", "value_denied"), ("confirm", "read_back"), ("answer", "confirmed")], t
    heard = t[2]["decision"]["slots"]["amount"]
    assert f"payment of {heard} dollars, is that right" in t[2]["decision"]["prompt"]
    assert t[3]["intent"] == "affirm" and t[3]["decision"]["slots"] == {"amount": heard}  # what was read back is paid
    assert t[0]["decision"]["slots"]["amount"] != heard  # the first amount was turned down and not taken

    after = bot.metrics()
    for name, labels in (("voicebot_turn_latency_seconds_count", {"transport": "twilio"}),
                         ("voicebot_intent_confidence_count", None),
                         ("voicebot_policy_decisions_total", {"action": "answer", "reason": "accepted"}),
                         ("voicebot_escalations_total", {"reason": "agent_requested"}),
                         ("voicebot_calls_total", {"transport": "twilio", "outcome": "transferred"})):
        assert metric_value(after, name, labels) > metric_value(before, name, labels), name
    lat = [c.result.turns[0].v2v_ms for c in (c1, c2, c4)]
    print("scenario v2v at caller (ms):", lat)
