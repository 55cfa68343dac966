"""What a caller gets when the worker's shutdown grace (BOT_SHUTDOWN_GRACE_S) runs out on their live call, over
Twilio against a real `bot serve` (SIGTERM), a real Redis and the local Twilio REST fake:

- a call whose transfer to a human is in flight is left to finish it and is recorded `transferred`, not `shutdown`;
- a call that just sits there is told (a short pre-rendered prompt), handed to the policy's system-error queue
  with its context (escalation reason `shutdown`, webhook delivered before the worker exits), ended `shutdown`;
  when that transfer fails, it is told so (short) rather than dropped;
- with that queue closed, it hears the short goodbye instead, then ends `shutdown`; a long answer the bot is in
  the middle of is cut for it (recorded as heard so far), not played on past the grace;
- a call that ends by itself during the grace keeps its own outcome; no call is left `active`."""

from __future__ import annotations

import asyncio
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.conversation import SHUTDOWN_TEXT, SHUTDOWN_TRANSFER_FAILED_TEXT, SHUTDOWN_TRANSFER_TEXT
from ops.load.spawn import SHARED_VOICE_CACHE
from tests.helpers.bot import open_policy, place_call, twilio_env, wait_outcome
from tests.helpers.fake_twilio import FakeTwilioApi
from tests.helpers.server import BotServer, isolated_redis_url

pytestmark = pytest.mark.slow
GRACE_S = 4.0
END_S = 8.0  # ConversationConfig.shutdown_end_s (default)


def _server(redis_url: str, tmp: Path, base: Path, fake_api: FakeTwilioApi, policy: Path) -> BotServer:
    data = base / "shared-data"
    if SHARED_VOICE_CACHE.exists() and not (data / "voice-cache").exists():
        shutil.copytree(SHARED_VOICE_CACHE, data / "voice-cache")  # rendering every prompt cold takes minutes
    env = twilio_env(fake_api.url, policy, base, BOT_SHUTDOWN_GRACE_S=str(GRACE_S),
                     BOT_ESCALATION_WEBHOOK=f"{fake_api.url}/escalations")
    return BotServer(isolated_redis_url(redis_url), tmp, env).start(timeout_s=300)


async def _wait_bot_speaks(caller: Any, timeout_s: float) -> bool:
    """Until the bot sends this (silent) caller audio again."""
    before = caller.play.played_samples
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not caller.ended:
        if caller.play.played_samples > before + 800:
            return True
        await asyncio.sleep(0.02)
    return False


def _heard(got: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e for e in got["events"] if e["type"] == "prompt_heard" and e["kind"] == kind]


async def _exit_code(server: BotServer) -> int:
    assert server.proc is not None
    return await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 40)


async def test_grace_end_lets_a_transfer_finish_and_hands_the_idle_caller_to_a_person(
        redis_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, fake_api: FakeTwilioApi) -> None:
    server = _server(redis_url, tmp_path, tmp_path_factory.getbasetemp(), fake_api, open_policy(tmp_path / "p.yaml"))
    gate = threading.Event()
    try:
        calls = []
        for _ in range(4):  # one at a time: each must hear its greeting end (wait_bot_quiet counts from now)
            c = await place_call(server.url)
            assert await c.wait_bot_quiet(quiet_s=0.3, timeout_s=30)
            calls.append(c)
        idle, moving, leaving, unlucky = calls
        fake_api.completed.add(unlucky.call_sid)  # Twilio refuses its redirect (21220): the hand-over fails
        moving_sid = moving.call_sid

        def hold(call_sid: str) -> None:  # the transfer's REST answer comes only once the grace is over
            if call_sid == moving_sid:
                gate.wait(30)

        fake_api.before_update = hold
        n_esc = len(fake_api.escalations)
        assert server.proc is not None
        t_sig = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        await moving.send_dtmf("0")  # "agent": announced, then the REST redirect (held above)
        await asyncio.sleep(0.5)
        await leaving.hangup()  # ends by itself during the grace
        # the idle caller, silent since the greeting, is told at the grace's end: no silence then a dead line
        assert await _wait_bot_speaks(idle, GRACE_S + 15)
        told_after = time.monotonic() - t_sig
        gate.set()
        assert await idle.wait_ended(END_S + 10) and await moving.wait_ended(END_S + 10)
        assert await unlucky.wait_ended(END_S + 10)
        ended_after = time.monotonic() - t_sig
        for c in (idle, moving, unlucky):
            await c.close()
        assert await _exit_code(server) == 0, server.logs()[-3000:]
        assert GRACE_S - 0.5 <= told_after <= GRACE_S + 10, told_after
        assert ended_after <= GRACE_S + END_S + 6, ended_after

        got = {c.call_sid: await wait_outcome(server.redis_url, c.call_sid, 5) for c in calls}
        assert all(g["record"]["status"] == "ended" for g in got.values()), got  # none left `active`
        assert got[leaving.call_sid]["record"]["outcome"] == "caller_hangup"

        # the transfer in flight was left to finish: the caller reached a person, and the record says so
        mv = got[moving_sid]
        assert mv["record"]["outcome"] == "transferred", mv["record"]
        tr = [e for e in mv["events"] if e["type"] == "transfer"]
        assert len(tr) == 1 and tr[0]["ok"] is True and tr[0]["reason"] != "shutdown", tr
        assert [e["action"] for e in mv["events"] if e["type"] == "shutdown"] == ["left_to_finish"]

        # the idle caller heard the short prompt in full and was handed over with its context
        idl = got[idle.call_sid]
        assert idl["record"]["outcome"] == "shutdown", idl["record"]
        said = _heard(idl, "shutdown")
        assert len(said) == 1 and said[0]["text"] == SHUTDOWN_TRANSFER_TEXT and not said[0]["interrupted"], said
        tr = [e for e in idl["events"] if e["type"] == "transfer"]
        assert len(tr) == 1 and tr[0]["ok"] is True and tr[0]["reason"] == "shutdown", tr
        assert tr[0]["context"]["reason"] == "shutdown" and tr[0]["context"]["call_id"] == idle.call_sid
        redirect = [r for r in fake_api.requests if idle.call_sid in r["path"]]
        assert redirect and "general" in redirect[-1]["form"].get("Twiml", ""), redirect
        # the contact center's escalation receiver heard of it before the worker exited
        esc = [e["body"] for e in fake_api.escalations[n_esc:] if e["body"].get("call_id") == idle.call_sid]
        assert esc and esc[0]["reason"] == "shutdown", fake_api.escalations[n_esc:]

        # a hand-over Twilio refused: the caller is told, in full, then the call ends `shutdown`
        un = got[unlucky.call_sid]
        assert un["record"]["outcome"] == "shutdown", un["record"]
        said = [e["text"] for e in un["events"] if e["type"] == "prompt_heard" and e["kind"] == "shutdown"
                and not e["interrupted"]]
        assert said == [SHUTDOWN_TRANSFER_TEXT, SHUTDOWN_TRANSFER_FAILED_TEXT], un["events"]
        assert [e["ok"] for e in un["events"] if e["type"] == "transfer"] == [False]
    finally:
        fake_api.before_update = None
        fake_api.completed.clear()
        gate.set()
        server.stop()


def _closed_system_error_policy(path: Path) -> Path:
    """Every queue open, except the one the system-error rule (and so a shutdown hand-over) goes to."""
    open_policy(path)
    doc = yaml.safe_load(path.read_text())
    doc["queues"]["closed_desk"] = {"target": "closed_desk", "hours": {"timezone": "UTC", "weekly": {}},
                                    "out_of_hours": {"action": "callback", "prompt": "callback_offer"}}
    doc["escalation"]["system_error"]["queue"] = "closed_desk"
    # key 2 (check_balance) answers with this: ~20 s of speech, still playing when the grace runs out
    doc["prompts"]["balance"] = " ".join(["Your balance and due date are in your latest statement."] * 6)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    from policies.schema import parse_policy

    parse_policy(path.read_text())
    return path


async def test_grace_end_with_the_queue_closed_says_a_short_goodbye(
        redis_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, fake_api: FakeTwilioApi) -> None:
    server = _server(redis_url, tmp_path, tmp_path_factory.getbasetemp(), fake_api,
                     _closed_system_error_policy(tmp_path / "p.yaml"))
    try:
        caller = await place_call(server.url)
        assert await caller.wait_bot_quiet(quiet_s=0.3, timeout_s=30)
        n_req = len(fake_api.requests)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(GRACE_S - 3)
        await caller.send_dtmf("2")  # the long answer starts now and is mid-sentence at the grace's end
        assert await caller.wait_ended(GRACE_S + END_S + 10)
        await caller.close()
        assert await _exit_code(server) == 0, server.logs()[-3000:]
        got = await wait_outcome(server.redis_url, caller.call_sid, 5)
        assert got["record"]["status"] == "ended" and got["record"]["outcome"] == "shutdown", got["record"]
        cut = _heard(got, "answer")
        assert len(cut) == 1 and cut[0]["interrupted"] and cut[0].get("by") == "shutdown", cut
        assert cut[0]["heard_ms"] < 15000, cut
        said = _heard(got, "shutdown")
        assert len(said) == 1 and said[0]["text"] == SHUTDOWN_TEXT and not said[0]["interrupted"], said
        assert [e["action"] for e in got["events"] if e["type"] == "shutdown"] == ["goodbye"]
        assert not [e for e in got["events"] if e["type"] == "transfer"]
        assert not [r for r in fake_api.requests[n_req:] if caller.call_sid in r["path"]]  # no redirect tried
    finally:
        server.stop()


async def test_grace_end_on_a_line_that_cannot_be_transferred_says_goodbye_not_transfer(
        redis_url: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, fake_api: FakeTwilioApi) -> None:
    """Twilio without REST credentials (a dev setup: unsigned webhooks, no TWILIO_AUTH_TOKEN) cannot move a live
    call: the caller hears the goodbye, not "I have to transfer you" followed by "I couldn't"."""
    base = tmp_path_factory.getbasetemp()
    data = base / "shared-data"
    if SHARED_VOICE_CACHE.exists() and not (data / "voice-cache").exists():
        shutil.copytree(SHARED_VOICE_CACHE, data / "voice-cache")
    env = twilio_env(fake_api.url, open_policy(tmp_path / "p.yaml"), base, BOT_SHUTDOWN_GRACE_S="1",
                     TWILIO_AUTH_TOKEN="", TWILIO_ACCOUNT_SID="")
    server = BotServer(isolated_redis_url(redis_url), tmp_path, env).start(timeout_s=300)
    try:
        caller = await place_call(server.url, token="")
        assert await caller.wait_bot_quiet(quiet_s=0.3, timeout_s=30)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert await caller.wait_ended(1 + END_S + 10)
        await caller.close()
        assert await _exit_code(server) == 0, server.logs()[-3000:]
        got = await wait_outcome(server.redis_url, caller.call_sid, 5)
        assert got["record"]["outcome"] == "shutdown", got["record"]
        said = [e["text"] for e in _heard(got, "shutdown")]
        assert said == [SHUTDOWN_TEXT], got["events"]
        assert [e["action"] for e in got["events"] if e["type"] == "shutdown"] == ["goodbye"]
        assert not [e for e in got["events"] if e["type"] == "transfer"]
        assert "shutdown_transfer_unavailable" in server.logs()
    finally:
        server.stop()
