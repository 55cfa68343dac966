"""Full stack over SIP: baresip calls a real `bot serve` subprocess (engine, policy, Redis).

Call 1: the caller says a request after the greeting; Redis holds the call with transport="sip" and
the turn's recognized intent. Call 2: the caller presses 0# (speak to an agent); the bot REFERs
baresip to the queue's SIP URI (a SipServer playing the human agent), baresip follows it, NOTIFYs
200, and the record shows the transfer."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.helpers.audio import silence, synth
from tests.helpers.bot import call_record, open_policy, wait_outcome
from ops.load.spawn import free_port_both
from tests.helpers.server import BotServer, isolated_redis_url, metric_value

from .baresip import BARESIP, Baresip, voiced_fraction
from .conftest import RecordingHandler

pytestmark = [pytest.mark.slow, pytest.mark.skipif(BARESIP is None, reason="baresip not installed")]


@pytest.fixture
async def agent(make_server, sip_settings) -> AsyncIterator[tuple[RecordingHandler, Any]]:
    handler = RecordingHandler(np.zeros(800, dtype=np.int16))
    srv = await make_server(handler, sip_settings)
    yield handler, srv


async def _sip_bot(redis_url: str, tmp_path: Path, workers: int = 1, fresh_db: bool = True, name: str = "bot",
                   **env: str) -> BotServer:
    """`bot serve` with SIP on a free port (BOT_SIP_PORT in .env), the open test policy, the voice cache shared by
    the test servers, started (a loaded box starts slowly). fresh_db=False: on `redis_url`'s DB as it is (a second
    host of the same deployment, in tmp_path / name)."""
    sip_port = free_port_both()  # SIP listens on UDP and TCP
    env = {"BOT_POLICY": str(open_policy(tmp_path / "policy.yaml")), "BOT_NO_INPUT_S": "60",
           "BOT_SIP_ENABLED": "1", "BOT_SIP_PORT": str(sip_port), **env}
    (tmp_path / name).mkdir()
    server = BotServer(isolated_redis_url(redis_url) if fresh_db else redis_url, tmp_path / name, env,
                       workers=workers, flush_db=fresh_db)
    server.env["BOT_DATA_DIR"] = str(tmp_path.parent / "shared-data")  # voice cache shared by test servers
    await asyncio.get_running_loop().run_in_executor(None, server.start, 240.0)
    return server


async def test_baresip_calls_bot_serve_intent_and_refer(redis_url: str, tmp_path: Path, agent) -> None:
    handler, agent_srv = agent
    # Call 1 audio: quiet while the greeting plays, one request, then silence (aufile ends the call at EOF).
    speech_wav = tmp_path / "speech.wav"
    sf.write(str(speech_wav), np.concatenate([silence(6000), synth("I want to pay my bill"), silence(40000)]),
             8000, subtype="PCM_16")
    quiet_wav = tmp_path / "quiet.wav"
    sf.write(str(quiet_wav), silence(40000), 8000, subtype="PCM_16")
    server = await _sip_bot(redis_url, tmp_path, BOT_TRANSFER_WAIT_S="1",
                            BOT_SIP_QUEUE_URIS=f"general=sip:general@127.0.0.1:{agent_srv.port}")
    sip_port = int(server.env["BOT_SIP_PORT"])
    ready = httpx.get(f"{server.url}/readyz", timeout=5).json()
    assert ready["sip"] == "listening" and ready["ready"], ready
    ua1 = Baresip(tmp_path / "ua1", speech_wav)
    ua2 = Baresip(tmp_path / "ua2", quiet_wav)
    m = ""
    try:
        # --- call 1: a spoken request -------------------------------------------------------------
        await ua1.start()
        await ua1.send(f"/dial sip:bot@127.0.0.1:{sip_port}")
        await ua1.wait_for(r"Call established", 15)
        call1 = await _sip_call_id(server, set(), 15)
        turns = await _wait_events(server.redis_url, call1, "turn", 1, 40)
        engine_escalated = (turns[0].get("decision") or {}).get("action") == "transfer"
        await asyncio.sleep(2.0)  # hear the answer
        if not engine_escalated:
            await ua1.send("/hangup")
        got1 = await wait_outcome(server.redis_url, call1, timeout_s=30)
        # --- call 2: keypad 0# -> speak_to_agent -> REFER to queue "general" -------------------------
        await ua2.start()
        await ua2.send(f"/dial sip:bot@127.0.0.1:{sip_port}")
        await ua2.wait_for(r"Call established", 15)
        call2 = await _sip_call_id(server, {call1}, 15)
        await asyncio.sleep(0.5)
        await ua2.send("/sndcode 0#")
        await asyncio.wait_for(handler.new_call.wait(), 30)  # baresip followed our REFER to the agent
        got2 = await wait_outcome(server.redis_url, call2, timeout_s=30)
    finally:
        await ua1.stop()
        await ua2.stop()
        if server.proc and server.proc.poll() is None:
            m = server.metrics()
        server.stop()
    rec1 = got1["record"]
    assert rec1["transport"] == "sip", rec1
    assert (rec1.get("signalling"), rec1.get("media")) == ("udp", "rtp"), rec1  # how it travelled, in its record
    ended = [e for e in got1["events"] if e["type"] == "call_ended"]
    audio = ended[-1].get("audio") if ended else None  # the RTP quality the SIP bridge measured, in the story
    assert isinstance(audio, dict) and audio["rx_packets"] > 50 and audio["rx_loss_pct"] < 5, ended
    turn = turns[0]
    print(f"sip full stack: turn intent={turn.get('intent')} conf={turn.get('confidence')} "
          f"transcript={turn.get('transcript')!r} error={turn.get('error')}")
    if turn.get("error"):  # no understanding model installed (yet): the policy escalates on engine_error
        assert engine_escalated and rec1["outcome"] == "transferred", rec1
    else:
        # Recognized through G.711/RTP/jitter buffer: the right intent, at worst the runner-up.
        top2 = [a[0] for a in (turn.get("alternatives") or [])[:2]]
        assert turn.get("intent") == "pay_bill" or "pay_bill" in top2, turn
        assert rec1["outcome"] == "caller_hangup", rec1
    assert voiced_fraction(ua1.recording("dec")) > 0.1  # baresip heard the bot's voice
    rec2 = got2["record"]
    assert rec2["transport"] == "sip" and rec2["outcome"] == "transferred", (rec2, server.logs()[-3000:])
    transfer = [e for e in got2["events"] if e["type"] == "transfer"]
    assert transfer and transfer[0]["ok"] and transfer[0]["target"] == "general"
    assert transfer[0]["context"]["transport"] == "sip" and transfer[0]["context"]["call_id"] == call2
    assert transfer[0]["context"]["intent"] == "speak_to_agent"
    assert handler.calls[-1]["bridge"].info.called == "general"
    assert metric_value(m, "voicebot_sip_messages_total", {"method": "REFER"}) >= 1
    assert metric_value(m, "voicebot_transfers_total", {"transport": "sip", "result": "ok"}) >= 1


async def _sip_call_id(server: BotServer, known: set[str], timeout: float) -> str:
    import redis

    r = redis.Redis.from_url(server.redis_url, decode_responses=True)
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for key in r.scan_iter("call:*"):
            cid = key.split(":", 1)[1]
            if key.count(":") == 1 and cid not in known and r.hget(key, "transport") == "sip":
                return cid
        await asyncio.sleep(0.2)
    raise TimeoutError(f"no new SIP call record in Redis; log tail:\n{server.logs()[-3000:]}")


async def _wait_events(redis_url: str, call_id: str, kind: str, n: int, timeout: float) -> list[dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        evs = [e for e in call_record(redis_url, call_id)["events"] if e["type"] == kind]
        if len(evs) >= n:
            return evs
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"only {len(evs)} {kind} events")
        await asyncio.sleep(0.2)


async def _read_back_pending(server: BotServer, caller: Any) -> dict[str, Any]:
    """Dial, let the greeting play, ask to pay 40 dollars: the bot's read-back ("That's a payment of ..., is that
    right?") waits for the caller's yes. Returns that decision."""
    assert await caller.invite() == 200
    await caller.wait_bot_quiet(quiet_s=0.6, max_s=20)
    await caller.play(synth("I'd like to pay forty dollars"), "pay")
    asked = (await _wait_events(server.redis_url, caller.call_id, "turn", 1, 40))[0]["decision"]
    assert (asked["action"], asked["reason"]) == ("confirm", "read_back"), asked
    return asked


async def test_caller_holding_the_bot_is_not_asked_are_you_still_there(redis_url: str, tmp_path: Path) -> None:
    """A caller who puts the bot on hold (re-INVITE sendonly) is silent by choice: no no-input reprompt or
    goodbye while on hold; after resuming, the call goes on and ends as the caller's hangup."""
    from telephony.sip.uac import SipCaller

    server = await _sip_bot(redis_url, tmp_path, BOT_NO_INPUT_S="1.5")
    caller = SipCaller("127.0.0.1", int(server.env["BOT_SIP_PORT"]))
    await caller.open()
    try:
        assert await caller.invite() == 200
        assert await caller.reinvite("sendonly") == 200  # on hold during the greeting
        await asyncio.sleep(6.0)  # four no-input timeouts: two would end the call
        assert not caller.ended.is_set()
        assert await caller.reinvite("sendrecv") == 200
        await asyncio.sleep(0.5)
        assert not caller.ended.is_set()
        assert await caller.bye() == 200
        got = await wait_outcome(server.redis_url, caller.call_id, timeout_s=20)
    finally:
        caller.close()
        server.stop()
    assert got["record"]["outcome"] == "caller_hangup", got["record"]
    assert not [e for e in got["events"] if e["type"] == "no_input"]
    assert not [e for e in got["events"] if e.get("marks_missing")]


async def test_a_replacing_leg_carries_on_the_conversation(redis_url: str, tmp_path: Path) -> None:
    """Attended transfer or pickup onto a bot call (INVITE with Replaces naming the bot's dialog): the new leg
    takes the conversation over where it was. The read-back the caller had not answered yet is asked again
    ("Thanks for waiting. That's a payment of ... is that right?"), not the greeting; the old leg ends `replaced`
    and the new record names it."""
    from bot.conversation import RESUMED_PENDING_TEXT
    from telephony.sip.uac import SipCaller

    from .test_qa_media_dialogs import _ack, _final, _rtp_sock, _sdp
    from .test_server import RawUdp

    server = await _sip_bot(redis_url, tmp_path)
    sip_port = int(server.env["BOT_SIP_PORT"])
    caller = SipCaller("127.0.0.1", sip_port)
    await caller.open()
    raw = RawUdp()
    media = _rtp_sock("127.0.0.1")
    try:
        asked = await _read_back_pending(server, caller)
        extra = (f"Content-Type: application/sdp\r\nContact: <sip:raw@127.0.0.1:{raw.port}>\r\n"
                 f"Replaces: {caller.call_id};to-tag={caller.to_tag};from-tag={caller.from_tag}\r\n"
                 "Require: replaces\r\n")
        raw.sock.sendto(raw.request("INVITE", sip_port, extra, _sdp("127.0.0.1", media.getsockname()[1]),
                                    call_id="repl-e2e-1"), ("127.0.0.1", sip_port))
        ok = await _final(raw, timeout=10)
        assert ok.status == 200
        _ack(raw, sip_port, ok, "repl-e2e-1", 1)
        await asyncio.wait_for(caller.ended.wait(), 10)  # the replaced leg got the bot's BYE
        restored = (await _wait_events(server.redis_url, "repl-e2e-1", "progress_restored", 1, 20))[0]
        assert restored["restored"] and restored["pending"] == "confirm", restored
        assert restored["from_call"] == caller.call_id
        heard = await _wait_events(server.redis_url, "repl-e2e-1", "prompt_heard", 1, 30)
        assert heard[0]["kind"] == "greeting" and heard[0]["text"] == f"{RESUMED_PENDING_TEXT} {asked['prompt']}"
        old = await wait_outcome(server.redis_url, caller.call_id, timeout_s=20)
        assert old["record"]["outcome"] == "replaced", old["record"]
        assert call_record(server.redis_url, "repl-e2e-1")["record"]["replaces"] == caller.call_id
    finally:
        caller.close()
        raw.close()
        media.close()
        server.stop()


async def test_sip_call_of_a_killed_worker_comes_back_from_its_replacement(redis_url: str, tmp_path: Path) -> None:
    """Worker 0 (the SIP port) is SIGKILLed mid-call, with a read-back waiting for the caller's answer. The
    supervisor starts a new worker 0, which re-INVITEs the phone from its own RTP port: the caller hears "Sorry,
    we were cut off." and the question again, says yes, and the payment read back is the one made. One record,
    two legs."""
    import os
    import signal

    from bot.conversation import RECONNECTED_PENDING_TEXT
    from telephony.sip.uac import SipCaller

    server = await _sip_bot(redis_url, tmp_path, workers=2)
    caller = SipCaller("127.0.0.1", int(server.env["BOT_SIP_PORT"]))
    await caller.open()
    try:
        asked = await _read_back_pending(server, caller)
        await caller.wait_bot_quiet(quiet_s=0.6, max_s=20)
        rec = call_record(server.redis_url, caller.call_id)["record"]
        assert rec.get("sip_dialog") and rec["status"] == "active"
        victim = int(rec["worker_pid"])
        os.kill(victim, signal.SIGKILL)
        t_kill = asyncio.get_running_loop().time()
        lost = await wait_outcome(server.redis_url, caller.call_id, timeout_s=25)
        assert lost["record"]["outcome"] == "worker_lost", lost["record"]
        deadline = t_kill + 120  # a new worker 0 loads the engine and its prompts on a busy box
        while not caller.reinvites and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        assert caller.reinvites, server.logs()[-3000:]
        assert not caller.ended.is_set()
        restored = (await _wait_events(server.redis_url, caller.call_id, "progress_restored", 1, 20))[0]
        assert restored["restored"] and restored["pending"] == "confirm", restored
        greeting = [e for e in await _wait_events(server.redis_url, caller.call_id, "prompt_heard", 3, 30)
                    if e["kind"] == "greeting"][-1]
        assert greeting["text"] == f"{RECONNECTED_PENDING_TEXT} {asked['prompt']}", greeting
        await caller.wait_bot_quiet(quiet_s=0.6, max_s=20)
        await caller.play(synth("yes"), "yes")
        yes = (await _wait_events(server.redis_url, caller.call_id, "turn", 2, 40))[1]
        assert yes["intent"] == "affirm", yes
        assert (yes["decision"]["action"], yes["decision"]["reason"]) == ("answer", "confirmed"), yes
        assert yes["decision"]["slots"] == asked["slots"]  # what was read back before the line went is what is paid
        assert await caller.bye() == 200
        got = await wait_outcome(server.redis_url, caller.call_id, timeout_s=20)
        m = server.metrics()
    finally:
        caller.close()
        server.stop()
    rec = got["record"]
    assert rec["outcome"] == "caller_hangup" and rec["leg"] == "2" and int(rec["worker_pid"]) != victim, rec
    resumed = [e for e in got["events"] if e["type"] == "call_resumed"]
    assert len(resumed) == 1 and resumed[0]["worker_pid"] != victim
    assert metric_value(m, "voicebot_sip_resumes_total", {"result": "resumed"}) == 1


async def _phone_carried_on(tmp_path: Path, dialed: BotServer, carrier: BotServer, quiet_ms: int,
                            kill: Callable[[dict[str, str]], None]) -> tuple[dict[str, Any], float, dict[str, Any]]:
    """A real SIP phone (baresip) calls `dialed`, quiet for `quiet_ms` (the greeting, the loss, the takeover) and
    then says "I want to pay my bill" thrice. After the greeting `kill(record)` kills the process serving it; the
    call must come back (`call_resumed`) from `carrier`, where a turn of the caller's is answered; then the phone
    hangs up. Checks what every takeover must show and returns (the record as it ends, seconds from the kill to
    call_resumed, the call_resumed event)."""
    from bot.conversation import RECONNECTED_TEXT

    request, gap = synth("I want to pay my bill"), silence(6000)
    wav = tmp_path / "caller.wav"
    sf.write(str(wav), np.concatenate([silence(quiet_ms), request, gap, request, gap, request, silence(20000)]),
             8000, subtype="PCM_16")
    loop = asyncio.get_running_loop()
    ua = Baresip(tmp_path / "ua", wav)
    try:
        await ua.start()
        await ua.send(f"/dial sip:bot@127.0.0.1:{dialed.env['BOT_SIP_PORT']}")
        await ua.wait_for(r"Call established", 15)
        t_established = loop.time()
        cid = await _sip_call_id(dialed, set(), 15)
        await _wait_events(dialed.redis_url, cid, "prompt_heard", 1, 30)  # the greeting went out
        rec = call_record(dialed.redis_url, cid)["record"]
        assert rec.get("sip_dialog"), rec
        kill(rec)
        killed = loop.time()
        resumed = (await _wait_events(dialed.redis_url, cid, "call_resumed", 1, 90))[0]
        back_after_s = loop.time() - killed
        assert resumed["leg"] == 2 and str(resumed["worker_pid"]) != str(rec["worker_pid"]), resumed
        turns_before = len([e for e in call_record(dialed.redis_url, cid)["events"] if e["type"] == "turn"])
        try:
            await _wait_events(dialed.redis_url, cid, "turn", turns_before + 1, 60)
        except TimeoutError as exc:
            raise AssertionError("\n".join(ln for ln in ua.lines if "audio=" not in ln)[-4000:] + "\n"
                                 + "\n".join(ln for ln in carrier.logs().splitlines() if "sip" in ln or "rtp" in ln
                                             or "call" in ln)[-12000:]) from exc
        await ua.send("/hangup")
        got = await wait_outcome(dialed.redis_url, cid, timeout_s=30)
        assert metric_value(carrier.metrics(), "voicebot_sip_resumes_total", {"result": "resumed"}) == 1
    finally:
        await ua.stop()
    events = got["events"]
    after = events[[e["type"] for e in events].index("call_resumed"):]
    greeting = next(e for e in after if e["type"] == "prompt_heard")
    assert greeting["text"] == RECONNECTED_TEXT and not greeting.get("interrupted"), greeting
    turn = next(e for e in after if e["type"] == "turn")
    top2 = [a[0] for a in (turn.get("alternatives") or [])[:2]]
    assert turn.get("intent") == "pay_bill" or "pay_bill" in top2, turn  # the caller heard by the carrier
    assert [e["outcome"] for e in events if e["type"] == "call_ended"] == ["worker_lost", "caller_hangup"], events
    # what the phone played after the kill: >= 1 s of the bot's voice again ("Sorry, we were cut off ..."), from
    # the carrier (the same RTP stream going on after a gap; a fresh SSRC and timestamp made baresip drop every
    # frame as "old")
    after_kill = ua.recording("dec")[int((killed - t_established + 1.0) * 8000):]
    assert voiced_fraction(after_kill) * after_kill.size / 8000 > 1.0
    return got, back_after_s, resumed


async def test_baresip_is_carried_on_by_the_replacement_of_a_killed_worker_0(redis_url: str, tmp_path: Path) -> None:
    """A real SIP phone (baresip) on a call whose worker 0 is SIGKILLed after the greeting: the new worker 0
    re-INVITEs it from a new RTP port, baresip takes the re-INVITE, hears the bot again ("Sorry, we were cut off
    ...") and its request, said after that, is understood by the new process on the same call."""
    import os
    import signal

    server = await _sip_bot(redis_url, tmp_path, workers=2)
    try:
        await _phone_carried_on(tmp_path, server, server, 14000,
                                lambda rec: os.kill(int(rec["worker_pid"]), signal.SIGKILL))
    finally:
        server.stop()


async def test_baresip_is_carried_on_by_another_host_when_its_host_is_lost(redis_url: str, tmp_path: Path) -> None:
    """Two hosts (two `bot serve`, worker ids host-a and host-b) on one Redis. A real SIP phone (baresip) talks to
    host-a, which is SIGKILLed after the greeting and never comes back. host-b sees host-a silent in Redis, finds
    nothing answering SIP as host-a at its address, and re-INVITEs the phone from its own address: baresip moves
    its audio and its signalling there (its BYE reaches host-b), hears the bot again, and its request is
    understood by host-b on the same call."""
    import os
    import signal

    fast = {"BOT_SIP_TAKEOVER_AFTER_S": "4"}  # 15 by default: three missed heartbeats
    host_a = await _sip_bot(redis_url, tmp_path, name="a", BOT_WORKER_ID="host-a", **fast)
    host_b = await _sip_bot(host_a.redis_url, tmp_path, fresh_db=False, name="b", BOT_WORKER_ID="host-b", **fast)

    def lose_host_a(rec: dict[str, str]) -> None:
        assert rec["worker"] == "host-a" and host_a.proc is not None, rec
        os.kill(host_a.proc.pid, signal.SIGKILL)  # the whole host: nothing restarts it

    try:
        got, back_after_s, _ = await _phone_carried_on(tmp_path, host_a, host_b, 24000, lose_host_a)
    finally:
        host_b.stop()
        host_a.stop()
    rec = got["record"]
    assert rec["worker"] == "host-b" and rec["reaped_by"] == "host-b-sip-adopt", rec
    assert back_after_s < 30, back_after_s  # BOT_SIP_TAKEOVER_AFTER_S + a 5 s pass + the re-INVITE, on a loaded box
