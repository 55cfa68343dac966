"""`bot calls show` as an on-call engineer reads it: a timeline relative to the call's start with what the bot
said, what the caller said and was understood as, and why it transferred; and it still works for a call in
progress, a call whose events are missing or garbled, an unknown id, non-ASCII transcripts on an ASCII
terminal; `bot calls` lists the recent calls. Real Redis, the real CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

from bot.state import CallStore, connect, events_key
from tests.conftest import ROOT


def _cli(redis_url: str, *args: str, ascii_terminal: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url}
    if ascii_terminal:  # cron, ssh without LANG: stdout cannot encode "é"
        env |= {"PYTHONIOENCODING": "ascii", "LC_ALL": "C", "LANG": "C"}
    return subprocess.run([sys.executable, "-m", "bot.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=str(ROOT), encoding="utf-8", errors="replace")


def _write(redis_url: str, fn) -> None:  # type: ignore[no-untyped-def]
    async def go() -> None:
        store = CallStore(connect(redis_url), worker="story-test", ttl_s=600)
        await store.start()
        try:
            fn(store)
            assert await store.flush()
        finally:
            await store.close()

    asyncio.run(go())


def _decision(action: str, reason: str, target: str | None = None) -> dict[str, object]:
    return {"action": action, "prompt": "", "target": target, "reason": reason, "intent": None, "slots": {}}


def test_a_finished_call_reads_as_a_story(redis_url: str) -> None:
    cid = "CA" + uuid.uuid4().hex

    def story(s: CallStore) -> None:
        s.start_call(cid, "twilio", "+14155550134", "+15550100999", "3")
        s.event(cid, "prompt_heard", utt=1, kind="greeting", text="Thanks for calling.", duration_ms=900,
                heard_ms=900, interrupted=False)
        s.event(cid, "turn", n=1, intent=None, confidence=0.97, slots={"account_number": "42719938"},
                transcript="my account number is four two seven one nine nine three eight",
                decision=_decision("reprompt", "no_context"))
        s.event(cid, "turn", n=2, intent="billing_question", confidence=0.91, slots={},
                transcript="j'ai une question sur ma facture, ça ne va pas",
                decision=_decision("transfer", "intent_action", "billing"))
        s.event(cid, "transfer", target="billing", ok=False, reason="intent_action", context={})
        s.end_call(cid, "transfer_failed", duration_s=12.5, turns=2)

    _write(redis_url, story)
    r = _cli(redis_url, "calls", "show", cid)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "ended: transfer_failed after 12.5 s, 2 turns" in out
    assert "4155550134" not in out and "*********34" in out  # the caller, masked
    # what the bot said, what the caller said (digits masked, spoken or not), what was understood and why
    assert 'bot said (greeting): "Thanks for calling."' in out
    assert "42719938" not in out and "four two seven" not in out
    assert 'caller turn 1: "my account number is ******38"' in out
    assert "understood no intent (0.97) account_number=******38 -> reprompt (no_context)" in out
    assert "ça ne va pas" in out  # non-ASCII as such, not \u00e7 escapes
    assert "understood billing_question (0.91) -> transfer billing (intent_action)" in out
    assert "transfer to billing: FAILED, asked for by intent_action" in out
    # times are relative to the start, in order
    rel = [line.split()[0] for line in out.splitlines() if line.strip().startswith("+")]
    assert float(rel[0][1:-1]) < 1 and len(rel) == 6
    assert [float(x[1:-1]) for x in rel] == sorted(float(x[1:-1]) for x in rel)
    # --json stays the machine contract: raw events, caller masked
    j = json.loads(_cli(redis_url, "calls", "show", cid, "--json").stdout)
    assert [e["type"] for e in j["events"]][-1] == "call_ended" and j["record"]["caller"] == "*********34"
    # an ASCII-only terminal gets escapes, not a UnicodeEncodeError traceback
    a = _cli(redis_url, "calls", "show", cid, ascii_terminal=True)
    assert a.returncode == 0 and "Traceback" not in a.stderr and "\\xe7a ne va pas" in a.stdout
    aj = _cli(redis_url, "calls", "show", cid, "--json", ascii_terminal=True)
    assert aj.returncode == 0 and "Traceback" not in aj.stderr
    # the listing names it
    ls = _cli(redis_url, "calls", "-n", "50")
    assert ls.returncode == 0, ls.stderr
    line = next(x for x in ls.stdout.splitlines() if cid in x)
    assert "transfer_failed" in line and "*********34" in line and "4155550134" not in ls.stdout


def test_a_live_call_shows_as_in_progress(redis_url: str) -> None:
    cid = "CA" + uuid.uuid4().hex

    def live(s: CallStore) -> None:
        s.start_call(cid, "sip", "sip:+15551234567@10.0.0.9", "+15550100999", "3")
        s.event(cid, "turn", n=1, intent="pay_bill", confidence=0.5, slots={"amount": 50},
                transcript="i want to pay fifty dollars", decision=_decision("confirm", "low_confidence"))
        s.event(cid, "turn", n=2, intent="deny", confidence=0.9, slots={}, slot_candidates={"amount": [15, 50]},
                transcript="no fifteen not fifty", decision=_decision("confirm", "read_back"))

    _write(redis_url, live)
    r = _cli(redis_url, "calls", "show", cid)
    assert r.returncode == 0, r.stderr
    assert "in progress" in r.stdout and "call still in progress" in r.stdout
    assert "understood pay_bill (0.50) amount=50 -> confirm (low_confidence)" in r.stdout
    assert "understood deny (0.90) heard amount 15 or 50 -> confirm (read_back)" in r.stdout
    assert "5551234567" not in r.stdout


def test_missing_and_garbled_events_are_shown_not_fatal(redis_url: str) -> None:
    cid = "CA" + uuid.uuid4().hex
    import redis

    r0 = redis.Redis.from_url(redis_url)
    key = events_key(cid)
    # no call record at all (expired), and events a crashed or foreign writer left
    r0.xadd(key, {"type": "turn", "t": "1796097069.5", "data": json.dumps({"n": 1, "intent": "pay_bill"})})
    r0.xadd(key, {"type": "turn", "t": "not-a-time", "data": "{truncated"})
    r0.xadd(key, {"t": "1796097070", "data": "[1, 2]"})
    r0.xadd(key, {"type": "prompt_heard", "data": json.dumps({"text": "Hello"})})
    r0.expire(key, 600)
    r = _cli(redis_url, "calls", "show", cid)
    assert r.returncode == 0, r.stderr
    assert "cannot read Redis" not in r.stderr
    out = r.stdout
    assert "no call record" in out
    assert "+0.000s  caller turn 1" in out and "understood pay_bill (?)" in out
    assert f"call     {cid}" in out
    assert "turn (unreadable payload): {truncated" in out and "(event without a type)" in out and '"Hello"' in out
    j = _cli(redis_url, "calls", "show", cid, "--json")
    assert j.returncode == 0 and len(json.loads(j.stdout)["events"]) == 4


def test_an_unknown_call_is_a_clear_error(redis_url: str) -> None:
    r = _cli(redis_url, "calls", "show", "CAnope" + uuid.uuid4().hex[:6])
    assert r.returncode == 1 and "no call CAnope" in r.stderr and r.stdout == ""
    assert "Traceback" not in r.stderr


def test_a_sip_call_carried_on_by_a_restarted_worker_reads_as_one_story(redis_url: str) -> None:
    """A SIP call whose worker died and whose phone the restarted worker re-INVITEd: both legs in one story, told
    as such; one the restarted worker only sent a BYE says so."""
    cid, gone = "sip-" + uuid.uuid4().hex, "sip-" + uuid.uuid4().hex

    def story(s: CallStore) -> None:
        for c in (cid, gone):
            s.start_call(c, "sip", "caller", "bot", "3")
        s.event(cid, "call_ended", outcome="worker_lost", worker="vm-w0", reaper="vm-supervisor")
        s.start_call(cid, "sip", "caller", "bot", "3", leg=2)
        s.end_call(cid, "caller_hangup", duration_s=30.0, turns=1)
        s.end_call(gone, "worker_lost")
        s.late_event(gone, "sip_takeover", result="hung_up")

    _write(redis_url, story)
    out = _cli(redis_url, "calls", "show", cid).stdout
    assert "call carried on by worker " in out and "(leg 2): the phone was re-INVITEd" in out, out
    assert "legs     2 (the phone was re-INVITEd after its worker died" in out, out
    out = _cli(redis_url, "calls", "show", gone).stdout
    assert "not carried on after its worker died: hung_up (the phone was sent a BYE)" in out, out


def test_softphone_and_reclaimed_calls_read_as_what_happened(redis_url: str) -> None:
    """A softphone call carried on by the browser's new connection, and a call its worker took back after being
    cut off from Redis (reaped meanwhile), each told in words."""
    web, cut = "webrtc-" + uuid.uuid4().hex[:16], "CA" + uuid.uuid4().hex

    def story(s: CallStore) -> None:
        s.start_call(web, "webrtc", "softphone:alice", "softphone", "v1")
        s.event(web, "call_ended", outcome="worker_lost", worker="vm-w1", reaper="vm-supervisor")
        s.event(web, "resume_failed", leg=2, reason="error:connect_timeout", waited_s=20.0, worker="vm-w0")
        s.start_call(web, "webrtc", "softphone:alice", "softphone", "v1", leg=2)
        s.start_call(cut, "twilio", "+15550001111", "+15550002222", "3")
        s.event(cut, "call_ended", outcome="worker_lost", worker="vm-w0", reaper="host-b")
        s.event(cut, "call_reclaimed", reaped_by="host-b", worker="vm-w0", worker_pid=42)

    _write(redis_url, story)
    out = _cli(redis_url, "calls", "show", web).stdout
    assert "call carried on by a new connection from the browser (leg 2" in out, out
    assert ("a new connection from the browser to carry the call on (leg 2) never connected "
            "(error:connect_timeout, after 20.0 s)") in out, out
    assert "legs     2 (the browser reconnected after its worker died" in out, out
    out = _cli(redis_url, "calls", "show", cut).stdout
    assert "call taken back by worker vm-w0: it had only been cut off from Redis, and host-b had ended it" in out, out


def test_a_sip_call_s_audio_quality_is_in_its_story(redis_url: str) -> None:
    """When a caller says the bot was choppy (or deaf), the story says which way the audio suffered."""
    cid = "sip-" + uuid.uuid4().hex

    def story(s: CallStore) -> None:
        s.start_call(cid, "sip", "caller", "bot", "3", extra={"signalling": "tls", "media": "srtp"})
        s.end_call(cid, "caller_hangup", duration_s=42.0, turns=2,
                   audio={"rx_packets": 1900, "rx_lost": 190, "rx_loss_pct": 9.1, "rx_jitter_ms": 34.0,
                          "peer_loss_pct": 0.2, "peer_jitter_ms": 3.0, "rtt_ms": 88.0})

    _write(redis_url, story)
    out = _cli(redis_url, "calls", "show", cid).stdout
    assert "via      sip (tls, srtp) on story-test" in out, out  # was the call encrypted: both legs of it
    assert ("audio from the caller: 9.1 % lost, jitter 34 ms; to the caller (its RTCP): 0.2 % lost, jitter 3 ms; "
            "round trip 88 ms") in out, out
