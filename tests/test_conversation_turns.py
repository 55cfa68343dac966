"""Turn taking on real audio through the real (batched) Silero VAD: end of turn, and what may and
may not interrupt the bot (its own echo at -20 dB, a cough, a 200 ms noise burst: no; the caller
talking over it: yes)."""

from __future__ import annotations


import numpy as np
import pytest

from bot.conversation_audio import level_dbfs
from bot.turns import TurnDetector
from tests.helpers.audio import attenuate, cough, noise_burst, silence, synth
from tests.helpers.turns import PARAMS, bot_voice_pcm, turn_events

@pytest.fixture(scope="module")
def bot_voice() -> np.ndarray:
    return bot_voice_pcm()


async def test_caller_turn_ends_after_silence() -> None:
    speech = synth("I want to pay my bill please")
    pcm = np.concatenate([silence(500), speech, silence(1300)])
    events = await turn_events(pcm, None)
    kinds = [e.kind for e in events]
    assert kinds == ["speech_started", "check_eot", "turn_end"], kinds
    end = events[-1]
    assert 0.3 <= end.speech_start_t <= 0.8  # speech begins at 0.5 s
    assert abs(end.speech_end_t - (0.5 + len(speech) / 8000)) < 0.35
    assert end.silence_ms >= PARAMS.max_silence_ms


async def test_eot_head_high_probability_ends_turn_early() -> None:
    det = TurnDetector(PARAMS)
    t = 0.0
    for _ in range(20):  # 640 ms of speech
        t += 0.032
        det.update(0.9, -20, t)
    ev = None
    for _ in range(8):
        t += 0.032
        ev = det.update(0.02, -60, t) or ev
    assert ev is not None and ev.kind == "check_eot"
    assert det.set_eot(0.2) is False  # caller only paused: keep waiting
    assert det.set_eot(0.9) is True  # finished: respond now


async def test_echo_of_bot_voice_does_not_barge_in(bot_voice: np.ndarray) -> None:
    echo = attenuate(bot_voice, -20)
    events = await turn_events(echo, level_dbfs(bot_voice))
    assert [e.kind for e in events if e.kind == "barge_in"] == []


@pytest.mark.parametrize("sound", ["cough", "noise_200ms"])
async def test_cough_or_noise_burst_does_not_barge_in(bot_voice: np.ndarray, sound: str) -> None:
    echo = attenuate(bot_voice, -20)
    burst = cough() if sound == "cough" else noise_burst(200)
    mix = echo.astype(np.int32)
    at = 8000  # 1 s into the bot's sentence
    mix[at : at + len(burst)] += burst
    events = await turn_events(np.clip(mix, -32768, 32767).astype(np.int16), level_dbfs(bot_voice))
    assert [e.kind for e in events if e.kind == "barge_in"] == []


async def test_caller_talking_over_bot_barges_in_fast(bot_voice: np.ndarray) -> None:
    caller = synth("no wait I need to talk to an agent", level_dbfs=-18)
    mix = attenuate(bot_voice, -20).astype(np.int32)
    at = 8000
    mix[at : at + len(caller)] += caller[: len(mix) - at]
    events = await turn_events(np.clip(mix, -32768, 32767).astype(np.int16), level_dbfs(bot_voice))
    barge = [e for e in events if e.kind == "barge_in"]
    assert len(barge) == 1
    # sustained-speech rule: detected after ~288 ms of speech, never before; VAD onset lag on top
    delay_ms = (barge[0].t - at / 8000) * 1000
    assert 250 <= delay_ms <= 700, delay_ms


def test_the_agent_gets_values_said_before_any_question(tmp_path) -> None:
    """An account number said first, then "agent": the transfer's context carries it to the human."""
    from bot.conversation_policy import CallPolicy, load_local_policy
    from engine.types import Understanding
    from tests.helpers.bot import open_policy

    # queues open around the clock: at night the default policy offers a callback instead of a transfer
    cp = CallPolicy(load_local_policy(str(open_policy(tmp_path / "policy.yaml"))), "1")
    cp.greeting()
    first = cp.on_turn(Understanding(intent=None, confidence=0.95, alternatives=[(None, 0.95)],
                                     slots={"account_number": "44721"}, transcript="my account number is 44721"))
    assert first.reason == "no_context"
    d = cp.on_turn(Understanding(intent="speak_to_agent", confidence=0.97, alternatives=[("speak_to_agent", 0.97)],
                                 transcript="agent"))
    assert d.action == "transfer"
    ctx = cp.handoff_context(d)
    assert ctx["slots"] == {"account_number": "44721"}
    assert ctx["transcript"] == ["my account number is 44721", "agent"]


def test_declined_callback_ends_as_out_of_hours_not_completed() -> None:
    """Queue closed, callback offered, caller says "no": the policy says goodbye, but the call's outcome
    must be `out_of_hours` (as when the offer goes unanswered), not `completed` (a served caller, which
    the dashboard's automation rate counts)."""
    import yaml

    from bot.conversation import _HANGUP_OUTCOME
    from bot.conversation_policy import CallPolicy
    from engine.types import Understanding
    from policies.schema import parse_policy
    from tests.helpers.policy_text import DEFAULT_TEXT

    doc = yaml.safe_load(DEFAULT_TEXT)
    doc["queues"]["general"]["hours"] = {"timezone": "UTC", "weekly": {}}  # never open
    policy = parse_policy(yaml.safe_dump(doc, sort_keys=False))

    def says(intent: str) -> Understanding:
        return Understanding(intent=intent, confidence=0.99, alternatives=[(intent, 0.99)], transcript=intent)

    def outcome(cp: CallPolicy, d) -> str:  # what Conversation._execute records for a hangup
        return _HANGUP_OUTCOME.get(cp.end_reason(d), "completed")

    for answer, want in (("deny", "out_of_hours"), ("goodbye", "out_of_hours"), ("affirm", "callback")):
        cp = CallPolicy(policy, "1")
        cp.greeting()
        offer = cp.on_turn(says("speak_to_agent"))
        assert (offer.action, offer.reason) == ("confirm", "out_of_hours")
        d = cp.on_turn(says(answer))
        assert d.action == "hangup" and outcome(cp, d) == want, (answer, d)
    cp = CallPolicy(policy, "1")  # a plain goodbye is still a served caller
    cp.greeting()
    d = cp.on_turn(says("goodbye"))
    assert outcome(cp, d) == "completed"


def test_every_escalation_hands_the_agent_the_request_in_progress(tmp_path) -> None:
    """Whatever moves the caller to a person mid-request (failures, frustration, "agent", an engine failure),
    the context names the request and its values, and the failed turns that led there. A failure transfer
    used to carry no intent (or the last "yes"), no values, and `failures: 0` (the counter after the transfer)."""
    from bot.conversation_policy import CallPolicy, load_local_policy
    from engine.types import Understanding
    from tests.helpers.bot import open_policy

    policy = load_local_policy(str(open_policy(tmp_path / "policy.yaml")))

    def says(intent: str | None, conf: float = 0.95, **kw) -> Understanding:
        return Understanding(intent=intent, confidence=conf, alternatives=[(intent, conf)],
                             transcript=f"<{intent}>", **kw)

    def call(*turns) -> tuple[CallPolicy, object]:
        cp = CallPolicy(policy, "7")
        d = cp.greeting()
        for t in turns:
            d = cp.on_failure("engine_timeout") if t == "engine" else cp.on_turn(t)
        assert d.action == "transfer", d
        return cp, d

    read_back = says("pay_bill", slots={"amount": 40.0})
    mumble = says("check_balance", 0.05)
    limit = policy.escalation.max_failures.count

    cp, d = call(says("pay_bill"), *[mumble] * limit)
    ctx = cp.handoff_context(d)
    assert (ctx["reason"], ctx["intent"], ctx["failures"], ctx["tries"]) == ("max_failures", "pay_bill", limit, limit + 1)
    assert len(ctx["transcript"]) == limit + 1 and ctx["policy_version"] == "7"

    # a frustrated "no" at the read-back (a frustrated "yes" completes the payment the caller just confirmed)
    cp, d = call(read_back, says("deny", caller_state={"frustration": 0.95}))
    ctx = cp.handoff_context(d)
    assert (ctx["reason"], ctx["intent"], ctx["slots"]) == ("frustration", "pay_bill", {"amount": 40.0})
    assert ctx["caller_state"] == {"frustration": 0.95}

    agent = policy.escalation.agent_request.intent
    cp, d = call(read_back, says(agent, 0.6), says("affirm"))
    ctx = cp.handoff_context(d)
    assert (ctx["reason"], ctx["intent"], ctx["slots"]) == ("agent_requested", "pay_bill", {"amount": 40.0})

    cp, d = call(says("pay_bill"), mumble, "engine")
    ctx = cp.handoff_context(d)
    assert (ctx["reason"], ctx["intent"], ctx["failures"]) == ("engine_error", "pay_bill", 1)

    # a request already served is no request in progress: an "agent" afterwards is just that
    cp, d = call(says("check_balance", 0.97), says(agent, 0.97))
    assert cp.handoff_context(d)["intent"] == agent
    # a read-back the caller said no to: the wrong value is not handed over as theirs
    cp, d = call(read_back, says("deny"), says(agent, 0.97))
    ctx = cp.handoff_context(d)
    assert (ctx["intent"], ctx["slots"]) == ("pay_bill", {})
