"""A real `bot serve` subprocess with a real Redis, driven over the Twilio Media Streams protocol by
the simulator: greeting latency, signatures, barge-in and echo, DTMF transfer over Twilio REST
(local wire-format fake), metrics, and every kind of bad input (each ends only its own call)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
import websockets

from bot.simulator import TwilioCaller
from tests.helpers.audio import synth
from tests.helpers.bot import ACCOUNT_SID, AUTH_TOKEN, call_record, open_policy, place_call, twilio_env, wait_outcome
from tests.helpers.fake_twilio import FakeTwilioApi
from tests.helpers.server import BotServer, isolated_redis_url, metric_value

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bot(redis_url: str, tmp_path_factory: pytest.TempPathFactory, fake_api: FakeTwilioApi) -> Iterator[BotServer]:
    tmp = tmp_path_factory.mktemp("bot")
    env = twilio_env(fake_api.url, open_policy(tmp / "policy.yaml"), tmp_path_factory.getbasetemp(),
                     BOT_ESCALATION_WEBHOOK=f"{fake_api.url}/escalations",
                     # a silent caller is not hung up on mid-test (the witness call below sits silent for
                     # as long as a slow machine takes to run the bad inputs)
                     BOT_NO_INPUT_S="60")
    server = BotServer(isolated_redis_url(redis_url), tmp, env)
    server.start(timeout_s=300)  # pre-rendering the prompts can take minutes on the loaded shared box
    try:
        yield server
    finally:
        server.stop()


async def test_greeting_within_300ms_and_call_recorded(bot: BotServer) -> None:
    caller = await place_call(bot.url)
    assert await caller.wait_bot_quiet(quiet_s=0.5, timeout_s=15)
    await caller.hangup()
    assert caller.result.greeting_ms is not None and caller.result.greeting_ms <= 300, caller.result.greeting_ms
    got = await wait_outcome(bot.redis_url, caller.call_sid)
    rec, events = got["record"], got["events"]
    assert rec["outcome"] == "caller_hangup" and rec["transport"] == "twilio" and rec["caller"] == "+15550100123"
    greet = [e for e in events if e["type"] == "prompt_heard" and e["kind"] == "greeting"]
    assert greet and not greet[0]["interrupted"] and greet[0]["heard_ms"] == greet[0]["duration_ms"] > 1000
    # the caller heard (played) about as much audio as the greeting lasted
    assert abs(len(caller.result.bot_audio) / 8 - greet[0]["duration_ms"]) < 100
    assert "+15550100123" not in bot.logs()  # raw numbers never reach the logs
    m = bot.metrics()
    assert metric_value(m, "voicebot_calls_total", {"transport": "twilio", "outcome": "caller_hangup"}) >= 1
    assert metric_value(m, "voicebot_greeting_latency_seconds_count", {"transport": "twilio"}) >= 1


async def test_forged_signatures_get_403_and_no_call(bot: BotServer) -> None:
    form = {"CallSid": "CAforged", "From": "+15550001111", "To": "+15550002222"}
    async with httpx.AsyncClient() as client:
        forged = await client.post(f"{bot.url}/twilio/voice", data=form, headers={"X-Twilio-Signature": "bm9wZQ=="})
        unsigned = await client.post(f"{bot.url}/twilio/voice", data=form)
    assert forged.status_code == 403 and unsigned.status_code == 403
    ws_url = bot.url.replace("http", "ws") + "/twilio/stream"
    for headers in ({"X-Twilio-Signature": "bm9wZQ=="}, {}):
        with pytest.raises(websockets.InvalidStatus) as exc:
            async with websockets.connect(ws_url, additional_headers=headers):
                pass
        assert exc.value.response.status_code == 403
    # a signature for another URL (e.g. replayed from the webhook) does not open the stream either
    caller = TwilioCaller(bot.url, AUTH_TOKEN, account_sid=ACCOUNT_SID, call_sid="CAreplayed")
    with pytest.raises(websockets.InvalidStatus):
        await caller.connect(sign_url=f"{bot.url}/twilio/voice")
    assert call_record(bot.redis_url, "CAforged")["record"] == {}
    assert call_record(bot.redis_url, "CAreplayed")["record"] == {}
    assert metric_value(bot.metrics(), "voicebot_errors_total", {"component": "twilio", "kind": "bad_signature"}) >= 5


def _media(sid: str, payload: str) -> str:
    return json.dumps({"event": "media", "streamSid": sid, "media": {"payload": payload}})


BAD_INPUTS = {
    "malformed_json": lambda sid: "{this is not json",
    "bad_base64": lambda sid: _media(sid, "***not base64***"),
    "oversized_frame": lambda sid: _media(sid, base64.b64encode(b"\xff" * 4000).decode()),
}


async def test_bad_inputs_end_only_their_own_call(bot: BotServer) -> None:
    witness = await place_call(bot.url)  # a healthy call that must not notice anything
    await asyncio.sleep(0.3)
    sids = {}
    for kind, make in BAD_INPUTS.items():
        c = await place_call(bot.url)
        await asyncio.sleep(0.2)
        await c.send_raw(make(c.stream_sid))
        assert await c.wait_ended(10), kind  # the bot closes the broken call
        await c.close()
        sids[kind] = c.call_sid
    # unknown events are logged, counted and recorded, but harmless (Twilio adds event types)
    # (a flood of them is recorded only MAX_RECORDED_UNKNOWN times); another stream's media and stop on
    # this socket neither feed nor end the call
    c = await place_call(bot.url)
    for _ in range(30):
        await c.send_raw(json.dumps({"event": "futureEvent", "streamSid": c.stream_sid}))
    await c.send_raw(_media("MZother", base64.b64encode(b"\xff" * 160).decode()))
    await c.send_raw(json.dumps({"event": "stop", "streamSid": "MZother", "stop": {"callSid": "CAother"}}))
    await asyncio.sleep(0.5)
    assert not c.ended
    await c.hangup()
    unknown_sid = c.call_sid
    # a WebSocket that vanishes mid-call (no close handshake, no stop)
    v = await place_call(bot.url)
    await asyncio.sleep(0.5)
    await v.vanish()
    # media before start: no call exists yet; refused after MAX_EARLY_MEDIA frames, no record made
    ws = await websockets.connect(bot.url.replace("http", "ws") + "/twilio/stream",
                                  additional_headers={"X-Twilio-Signature": witness.sign(
                                      bot.url.replace("http://", "wss://") + "/twilio/stream", {})})
    for _ in range(60):
        try:
            await ws.send(_media("MZearly", base64.b64encode(b"\xff" * 160).decode()))
        except websockets.ConnectionClosed:
            break
    with pytest.raises(websockets.ConnectionClosed):
        for _ in range(50):
            await ws.send(_media("MZearly", base64.b64encode(b"\xff" * 160).decode()))
            await asyncio.sleep(0.01)

    for kind, sid in sids.items():
        got = await wait_outcome(bot.redis_url, sid)
        assert got["record"]["outcome"] == f"error:{kind}", (kind, got["record"])
        assert any(e["type"] == "error" and e["kind"] == kind for e in got["events"]), kind
    got = await wait_outcome(bot.redis_url, unknown_sid)
    assert got["record"]["outcome"] == "caller_hangup"
    unknown = [e for e in got["events"] if e["type"] == "error" and e["kind"] == "unknown_event"]
    assert 1 <= len(unknown) <= 20
    assert any(e["type"] == "error" and e["kind"] == "wrong_stream" for e in got["events"])
    assert (await wait_outcome(bot.redis_url, v.call_sid))["record"]["outcome"] == "disconnected"

    # the witness is still served: it speaks and gets an answer
    assert not witness.ended
    turn = await witness.say(synth("what is my account balance"), wait_reply_s=12, quiet_s=0.3)
    assert turn.bot_audio_ms > 0, turn
    await witness.hangup()
    w = await wait_outcome(bot.redis_url, witness.call_sid)
    assert w["record"]["outcome"] == "caller_hangup"
    assert not [e for e in w["events"] if e["type"] == "error"]
    m = bot.metrics()
    for kind in [*BAD_INPUTS, "unknown_event", "disconnected", "media_before_start"]:
        assert metric_value(m, "voicebot_errors_total", {"component": "twilio", "kind": kind}) >= 1, kind
    logs = bot.logs()
    for sid in [*sids.values(), unknown_sid, v.call_sid]:
        assert f'"call_id": "{sid}"' in logs  # every error logged with its call id


async def test_repeated_or_inflated_end_mark_is_recorded_once(bot: BotServer) -> None:
    """A peer that echoes a mark twice, or names a position past the audio sent, gets one prompt_heard
    per prompt and heard_ms never above duration_ms."""
    caller = await place_call(bot.url)
    await asyncio.sleep(0.5)  # the greeting (utterance 1) is playing
    await caller.send_raw(json.dumps({"event": "mark", "streamSid": caller.stream_sid, "mark": {"name": "1:end999999"}}))
    await caller.send_raw(json.dumps({"event": "mark", "streamSid": caller.stream_sid, "mark": {"name": "1:end999999"}}))
    assert await caller.wait_bot_quiet(quiet_s=0.5, timeout_s=15)  # then the real marks come back
    await caller.hangup()
    got = await wait_outcome(bot.redis_url, caller.call_sid)
    heard = [e for e in got["events"] if e["type"] == "prompt_heard"]
    assert len(heard) == 1 and heard[0]["kind"] == "greeting", heard
    assert heard[0]["heard_ms"] <= heard[0]["duration_ms"], heard


async def test_echo_of_the_bot_does_not_interrupt_it(bot: BotServer) -> None:
    caller = await place_call(bot.url, echo_db=-20.0)
    assert await caller.wait_bot_quiet(quiet_s=0.6, timeout_s=15)
    await caller.hangup()
    assert caller.result.clears == 0
    got = await wait_outcome(bot.redis_url, caller.call_sid)
    greet = [e for e in got["events"] if e["type"] == "prompt_heard" and e["kind"] == "greeting"]
    assert greet and greet[0]["interrupted"] is False


async def test_caller_talking_over_the_bot_stops_it(bot: BotServer) -> None:
    speech = synth("wait wait I want to talk to a person about my account", level_dbfs=-16)
    caller = await place_call(bot.url, echo_db=-20.0)
    while caller.play.played_samples < 4000:  # 0.5 s into the greeting
        await asyncio.sleep(0.01)
    onset = time.monotonic()
    say = asyncio.get_running_loop().create_task(caller.say(speech, wait_reply_s=3, quiet_s=0.3))
    while caller.result.clears == 0 and time.monotonic() - onset < 5:
        await asyncio.sleep(0.005)
    stopped_after_ms = (time.monotonic() - onset) * 1000
    await say
    await caller.hangup()
    assert caller.result.clears >= 1
    got = await wait_outcome(bot.redis_url, caller.call_sid)
    greet = [e for e in got["events"] if e["type"] == "prompt_heard" and e["kind"] == "greeting"]
    assert greet and greet[0]["interrupted"] is True and greet[0]["by"] == "speech"
    assert 0 < greet[0]["heard_ms"] < greet[0]["duration_ms"]
    # barge-in needs ~288 ms of sustained speech; from that decision to `clear` leaving the bot
    # must stay well under the 150 ms budget, and the caller hears nothing after `clear`
    assert greet[0]["clear_ms"] <= 150, greet[0]
    assert stopped_after_ms <= 288 + 150 + 400, stopped_after_ms  # + VAD onset lag + CI slack
    print(f"barge-in: audio stopped {stopped_after_ms:.0f} ms after speech onset; "
          f"detect {greet[0]['detect_after_onset_ms']} ms, clear {greet[0]['clear_ms']} ms")


async def test_dtmf_agent_key_transfers_over_twilio_rest(bot: BotServer, fake_api: FakeTwilioApi) -> None:
    caller = await place_call(bot.url)
    await asyncio.sleep(0.4)
    await caller.send_dtmf("0")  # the policy's keypad option 0: speak_to_agent
    await caller.send_dtmf("#")
    assert await caller.wait_ended(20)
    await caller.close()
    got = await wait_outcome(bot.redis_url, caller.call_sid)
    assert got["record"]["outcome"] == "transferred"
    transfer = [e for e in got["events"] if e["type"] == "transfer"]
    assert transfer and transfer[0]["ok"] and transfer[0]["target"] == "general"
    ctx = transfer[0]["context"]
    assert ctx["intent"] == "speak_to_agent" and ctx["reason"] == "agent_requested" and "transcript" in ctx
    assert json.loads(got["record"]["handoff"])["call_id"] == caller.call_sid
    reqs = [r for r in fake_api.requests if caller.call_sid in r["path"]]
    assert len(reqs) == 1 and reqs[0]["auth_ok"]
    assert reqs[0]["path"] == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{caller.call_sid}.json"
    from xml.etree import ElementTree

    enqueue = ElementTree.fromstring(reqs[0]["form"]["Twiml"]).find("Enqueue")
    assert enqueue is not None and enqueue.text == "general"
    # when the queue ends without an agent (full, error), Twilio asks the bot what to do (an apology)
    assert enqueue.get("action", "").endswith("/twilio/transfer-status")
    hooks = [r for r in fake_api.requests if r["path"] == "/escalations"]
    assert hooks  # the human side was told too (BOT_ESCALATION_WEBHOOK)
    # the caller heard the transfer announcement before the call moved
    said = [e for e in got["events"] if e["type"] == "prompt_heard" and e["kind"] == "transfer"]
    assert said and not said[0]["interrupted"]
    assert any(e["type"] == "dtmf" and e["digit"] == "0" for e in got["events"])
    m = bot.metrics()
    assert metric_value(m, "voicebot_transfers_total", {"transport": "twilio", "result": "ok"}) >= 1
    assert metric_value(m, "voicebot_escalations_total", {"reason": "agent_requested"}) >= 1


async def test_menu_key_is_answered_without_the_inter_digit_wait(bot: BotServer) -> None:
    """A single menu key is a whole answer: the caller must not sit through the 2 s inter-digit
    timeout in silence. A '#' right after it (habit: "2#") neither cuts off the reply nor counts as a
    wrong key."""
    caller = await place_call(bot.url)
    assert await caller.wait_bot_quiet(quiet_s=0.3, timeout_s=15)
    before = caller.play.played_samples
    t0 = time.monotonic()
    await caller.send_dtmf("2")  # the policy's option 2: check_balance
    waited = None
    while time.monotonic() - t0 < 5:
        if caller.play.played_samples > before:
            waited = time.monotonic() - t0
            break
        await asyncio.sleep(0.01)
    assert waited is not None and waited < 1.5, waited  # was >= 2.0 s (the inter-digit timeout)
    await asyncio.sleep(0.4)
    await caller.send_dtmf("#")
    assert await caller.wait_bot_quiet(quiet_s=0.5, timeout_s=15)
    await caller.hangup()
    assert caller.result.clears == 0
    got = await wait_outcome(bot.redis_url, caller.call_sid)
    turns = [e for e in got["events"] if e["type"] == "dtmf_turn"]
    assert [t["decision"]["reason"] for t in turns] == ["dtmf_selection"], turns
    answer = [e for e in got["events"] if e["type"] == "prompt_heard" and e["kind"] == "answer"]
    assert answer and not answer[0]["interrupted"], answer


async def test_stream_stopped_before_the_rest_answer_still_records_the_transfer(bot: BotServer,
                                                                                fake_api: FakeTwilioApi) -> None:
    """Twilio stops the Media Stream as it moves the call to the queue, and the `stop` can arrive before
    the REST update's answer. The transfer must still land: outcome `transferred`, the transfer event and
    the handoff in the record (not `caller_hangup` with the hand-off context lost)."""
    caller = await place_call(bot.url)
    loop = asyncio.get_running_loop()

    def stop_stream_first(call_sid: str) -> None:
        if call_sid == caller.call_sid:
            asyncio.run_coroutine_threadsafe(caller.hangup(), loop).result(5)
            time.sleep(0.3)  # the bot sees the stream end while its REST request is in flight

    fake_api.before_update = stop_stream_first
    try:
        assert await caller.wait_bot_quiet(quiet_s=0.3, timeout_s=15)
        await caller.send_dtmf("0")  # the agent key
        assert await caller.wait_ended(20)
        got = await wait_outcome(bot.redis_url, caller.call_sid)
    finally:
        fake_api.before_update = None
    assert got["record"]["outcome"] == "transferred", got["record"]
    assert got["record"]["transfer_target"] == "general" and json.loads(got["record"]["handoff"])["reason"] == "agent_requested"
    transfer = [e for e in got["events"] if e["type"] == "transfer"]
    assert len(transfer) == 1 and transfer[0]["ok"], transfer


async def test_bot_call_cli_and_calls_show(bot: BotServer, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.helpers.audio import silence, write_wav

    wav = write_wav(tmp_path / "quiet.wav", silence(600))
    rec = tmp_path / "bot.wav"
    env = {**bot.env, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "REDIS_URL": bot.redis_url}
    out = subprocess.run([sys.executable, "-m", "bot.cli", "call", "--url", bot.url, str(wav), "--record", str(rec),
                          "--reply-timeout", "2", "--account-sid", "AC" + "7" * 32], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["greeting_ms"] is not None and summary["bot_audio_ms"] > 1000 and rec.stat().st_size > 16000
    show = subprocess.run([sys.executable, "-m", "bot.cli", "calls", "show", summary["call_sid"], "--json"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert show.returncode == 0, show.stderr
    got = json.loads(show.stdout)
    assert got["record"]["call_id"] == summary["call_sid"]
    assert got["record"]["account_sid"] == "AC" + "7" * 32  # the bot's REST transfers go out under it
    assert got["record"]["caller"].endswith("23") and "0100123" not in got["record"]["caller"]
    assert [e["type"] for e in got["events"]][:2] == ["call_started", "greeting_started"]
    missing = subprocess.run([sys.executable, "-m", "bot.cli", "calls", "show", "CAnope", "--json"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 1 and "no call" in missing.stderr


async def test_caller_hanging_up_mid_prompt_is_recorded_with_what_they_heard(bot: BotServer) -> None:
    c = await place_call(bot.url)
    await asyncio.sleep(0.6)  # into the greeting (~2 s)
    await c.hangup()
    got = await wait_outcome(bot.redis_url, c.call_sid)
    assert got["record"]["outcome"] == "caller_hangup"
    (greet,) = [e for e in got["events"] if e["type"] == "prompt_heard" and e["kind"] == "greeting"]
    assert greet["interrupted"] and greet["by"] == "call_ended" and greet["heard_ms"] < greet["duration_ms"]


async def test_a_lost_stream_comes_back_and_the_call_goes_on(bot: BotServer) -> None:
    """The stream's TCP connection breaks with the caller still on the line (a network failure, a worker that
    died): Twilio requests <Connect action>, the bot answers with a new stream for the same call, and the caller
    is told what happened and served, in the same call record, instead of hearing the line go dead."""
    from bot.conversation import RECONNECTED_TEXT

    before = metric_value(bot.metrics(), "voicebot_twilio_stream_ends_total", {"result": "reconnect"})
    caller = await place_call(bot.url)
    assert await caller.wait_bot_quiet(quiet_s=0.4, timeout_s=20)
    first_stream = caller.stream_sid
    caller.drop_stream()
    deadline = time.monotonic() + 20
    while caller.result.reconnects < 1 and not caller.ended and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert caller.result.reconnects == 1 and not caller.ended, caller.result.final_twiml
    assert caller.stream_sid != first_stream
    assert await caller.wait_bot_quiet(quiet_s=0.4, timeout_s=20)  # the bot speaks again on the new stream
    turn = await caller.say(synth("what is my account balance"), wait_reply_s=12, quiet_s=0.3)
    assert turn.v2v_ms is not None and turn.bot_audio_ms > 0, turn
    await caller.hangup()
    got = await wait_outcome(bot.redis_url, caller.call_sid)
    rec, events = got["record"], got["events"]
    assert rec["status"] == "ended" and rec["outcome"] == "caller_hangup" and rec["leg"] == "2", rec
    assert rec["stream_sid"] == caller.stream_sid  # the record follows the live stream
    # the call's duration runs from its first leg; the last leg's own is beside it
    assert float(rec["duration_s"]) > float(rec["leg_duration_s"]) > 0, rec
    kinds = [e["type"] for e in events]
    assert kinds[0] == "call_started" and kinds.count("call_resumed") == 1, kinds
    ends = [e["outcome"] for e in events if e["type"] == "call_ended"]
    assert ends == ["disconnected", "caller_hangup"], ends  # the lost leg, then the call's real end
    resumed = kinds.index("call_resumed")
    assert kinds.index("call_ended") < resumed
    greetings = [e for e in events[resumed:] if e["type"] == "prompt_heard" and e["kind"] == "greeting"]
    assert greetings and greetings[0]["text"] == RECONNECTED_TEXT  # not the first greeting again
    assert any(e["type"] == "turn" for e in events[resumed:])
    from bot.commands.calls import render_story

    story = "\n".join(render_story(rec, events, call_id=caller.call_sid))
    assert "call back on a new stream (leg 2" in story and "legs     2" in story, story
    after = metric_value(bot.metrics(), "voicebot_twilio_stream_ends_total", {"result": "reconnect"})
    assert after >= before + 1


async def test_a_call_the_bot_ended_is_hung_up_not_reconnected(bot: BotServer) -> None:
    """The bot closed the stream itself (here: a garbled message ends the call): Twilio's action request gets
    <Hangup/>, never a new stream."""
    caller = await place_call(bot.url)
    await asyncio.sleep(0.3)
    await caller.send_raw("{this is not json")
    assert await caller.wait_ended(15)
    await caller.close()
    assert caller.result.reconnects == 0 and "<Hangup" in caller.result.final_twiml, caller.result.final_twiml
    got = await wait_outcome(bot.redis_url, caller.call_sid)
    assert got["record"]["outcome"] == "error:malformed_json"
    assert not any(e["type"] == "call_resumed" for e in got["events"])


async def test_stream_ended_answers(bot: BotServer) -> None:
    """The <Connect action> endpoint on its own: signed only; a stream lost before any call started (refused by
    a draining worker) gets a new one with the next leg number and a fresh token; a call whose streams failed
    three times goes the policy's system-error way in Twilio's voice; a call Twilio reports over is hung up."""
    import redis as redis_sync
    from xml.etree import ElementTree

    def signed(url: str, form: dict[str, str]) -> dict[str, str]:
        return {"X-Twilio-Signature": TwilioCaller(bot.url, AUTH_TOKEN).sign(url, form)}

    base = f"{bot.url}/twilio/stream-ended"
    form = {"CallSid": "CAlost1", "AccountSid": ACCOUNT_SID, "From": "+15550100123", "To": "+15550100999",
            "Direction": "inbound", "CallStatus": "in-progress"}
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.post(f"{base}?leg=1", data=form)).status_code == 403
        res = await client.post(f"{base}?leg=1", data=form, headers=signed(f"{base}?leg=1", form))
        assert res.status_code == 200
        root = ElementTree.fromstring(res.text)
        connect = root.find("./Connect")
        assert connect is not None and connect.get("action") == f"{base}?leg=2", res.text
        params = {p.get("name"): p.get("value") for p in root.findall("./Connect/Stream/Parameter")}
        assert params["VoicebotLeg"] == "2" and params["CallSid"] == "CAlost1" and params["VoicebotStreamToken"]
        # the third lost stream of a call: no fourth, the system-error route (open queue: apology, then queue)
        r = redis_sync.Redis.from_url(bot.redis_url, decode_responses=True)
        r.hset("call:CAlost3", mapping={"status": "ended", "outcome": "worker_lost"})
        r.expire("call:CAlost3", 600)
        form3 = {**form, "CallSid": "CAlost3"}
        res = await client.post(f"{base}?leg=3", data=form3, headers=signed(f"{base}?leg=3", form3))
        root = ElementTree.fromstring(res.text)
        assert root.find("./Connect") is None and root.find("./Say") is not None, res.text
        assert root.find("./Enqueue") is not None or root.find("./Dial") is not None, res.text
        # a leg number that is not ours counts as the last one: no reconnection loop from a garbled URL
        res = await client.post(f"{base}?leg=99", data=form, headers=signed(f"{base}?leg=99", form))
        assert ElementTree.fromstring(res.text).find("./Connect") is None, res.text
        # a call Twilio says is over, and a call the bot ended: hang up
        over = {**form, "CallStatus": "completed"}
        res = await client.post(f"{base}?leg=1", data=over, headers=signed(f"{base}?leg=1", over))
        assert ElementTree.fromstring(res.text).find("./Hangup") is not None, res.text
        r.hset("call:CAdone", mapping={"status": "ended", "outcome": "completed"})
        r.expire("call:CAdone", 600)
        done = {**form, "CallSid": "CAdone"}
        res = await client.post(f"{base}?leg=1", data=done, headers=signed(f"{base}?leg=1", done))
        assert ElementTree.fromstring(res.text).find("./Hangup") is not None, res.text
    assert any(e["type"] == "stream_lost" for e in call_record(bot.redis_url, "CAlost3")["events"])
    # a call still active on a worker that never ends it (dead): after the settle wait its lost leg is closed
    # worker_lost right there, then the call gets its new stream
    r.hset("call:CAorphan", mapping={"status": "active", "outcome": "", "worker": "gone-w0", "worker_pid": "999999"})
    r.hset("calls:live:info", "CAorphan", json.dumps({"worker": "gone-w0", "pid": 999999, "transport": "twilio"}))
    r.zadd("calls:live", {"CAorphan": time.time() - 3})
    orphan = {**form, "CallSid": "CAorphan"}
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=10) as client:
        res = await client.post(f"{base}?leg=1", data=orphan, headers=signed(f"{base}?leg=1", orphan))
    assert ElementTree.fromstring(res.text).find("./Connect/Stream") is not None, res.text
    assert time.monotonic() - t0 >= 1.9  # it waited for an end that never came
    got = call_record(bot.redis_url, "CAorphan")
    (ended,) = [e for e in got["events"] if e["type"] == "call_ended"]
    assert ended["outcome"] == "worker_lost" and ended["reaper"].endswith("-stream-end"), ended
    assert got["record"]["status"] == "ended" and r.zscore("calls:live", "CAorphan") is None
    assert 0 < r.ttl("call:CAorphan") and 0 < r.ttl("call:CAorphan:events")  # expires if no new leg comes
    m = bot.metrics()
    for result in ("reconnect", "gave_up", "call_over", "hangup"):
        assert metric_value(m, "voicebot_twilio_stream_ends_total", {"result": result}) >= 1, result


async def test_a_lost_stream_carries_on_where_the_call_was(bot: BotServer) -> None:
    """The line goes while the bot waits for a yes to its read-back: on the new stream the caller hears that
    question again (not "how can I help you"), and their "yes" pays exactly the amount read back."""
    from bot.conversation import RECONNECTED_PENDING_TEXT

    caller = await place_call(bot.url)
    assert await caller.wait_bot_quiet(quiet_s=0.4, timeout_s=20)
    turn = await caller.say(synth("I'd like to pay forty dollars"), wait_reply_s=12, quiet_s=0.4)
    assert turn.v2v_ms is not None, turn
    before = call_record(bot.redis_url, caller.call_sid)["events"]
    asked = [e for e in before if e["type"] == "turn"][-1]["decision"]
    assert (asked["action"], asked["reason"]) == ("confirm", "read_back"), asked
    caller.drop_stream()
    deadline = time.monotonic() + 20
    while caller.result.reconnects < 1 and not caller.ended and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert caller.result.reconnects == 1, caller.result.final_twiml
    assert await caller.wait_bot_quiet(quiet_s=0.4, timeout_s=20)
    turn = await caller.say(synth("yes"), wait_reply_s=12, quiet_s=0.4)
    assert turn.v2v_ms is not None, turn
    await caller.hangup()
    events = (await wait_outcome(bot.redis_url, caller.call_sid))["events"]
    resumed = [e["type"] for e in events].index("call_resumed")
    restored = [e for e in events[resumed:] if e["type"] == "progress_restored"]
    assert restored and restored[0]["restored"] and restored[0]["pending"] == "confirm", restored
    greeting = [e for e in events[resumed:] if e["type"] == "prompt_heard" and e["kind"] == "greeting"][0]
    assert greeting["text"] == f"{RECONNECTED_PENDING_TEXT} {asked['prompt']}", greeting
    yes = [e for e in events[resumed:] if e["type"] == "turn"][0]
    assert yes["intent"] == "affirm", yes
    assert (yes["decision"]["action"], yes["decision"]["reason"]) == ("answer", "confirmed"), yes
    assert yes["decision"]["slots"] == asked["slots"]  # what was read back before the line went is what is paid
