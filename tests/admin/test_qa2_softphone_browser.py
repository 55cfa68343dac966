"""The softphone's keypad and its never-connected calls, against a live `bot serve` (queues open around the
clock): in Debian's Chromium an admin presses keys on the Softphone tab and the conversation acts on them
(the default policy's keypad menu: 0 = an agent, so a transfer attempt, which a browser call cannot
complete); a bad key sent on the page's keypad channel is refused with a clear message and counted; and an
aiortc peer whose ICE never completes leaves a call record with outcome error:connect_timeout and a
voicebot_calls_total entry, without a conversation having run."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from aiortc import RTCPeerConnection

from tests.admin.browser import FAKE_MIC, launch, open_softphone, shot, start_softphone_bot, wait_ended
from tests.helpers.webrtc_tone import Tone
from tests.helpers.bot import open_policy
from tests.helpers.server import BotServer, metric_value

TOKEN = "softphone-qa2-publisher-token"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bot(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotServer]:
    tmp = tmp_path_factory.mktemp("qa2-softphone")
    env = {"BOT_NO_INPUT_S": "30", "BOT_POLICY": str(open_policy(tmp / "open.yaml"))}
    srv = start_softphone_bot(redis_url, tmp, TOKEN, env)
    try:
        yield srv
    finally:
        srv.stop()


def webrtc_metric(bot: BotServer, name: str, **labels: str) -> float:
    return metric_value(bot.metrics(), name, {"transport": "webrtc", **labels} if name != "voicebot_errors_total"
                        else {"component": "webrtc", **labels})


def test_keypad_keys_reach_the_conversation(bot: BotServer, silence_wav: Path) -> None:
    """The softphone had no keypad: an admin could not try the policy's keypad menu from the console. The
    keypad's keys now reach the conversation as DTMF; 0 (agent) is acted on at once: a transfer attempt,
    which a browser call cannot complete (outcome transfer_failed). A key the bot does not take, sent on
    the keypad channel by a script, is refused with a message on the page, counted, and the call goes on."""
    from playwright.sync_api import expect, sync_playwright

    bad0 = webrtc_metric(bot, "voicebot_errors_total", kind="bad_dtmf")
    with sync_playwright() as pw:
        browser = launch(pw, FAKE_MIC + [f"--use-file-for-fake-audio-capture={silence_wav}"])
        page = open_softphone(browser, bot, TOKEN)
        key0 = page.locator('#sp-keypad button[data-key="0"]')
        expect(key0).to_be_disabled()  # no call, no keypad
        page.click("#sp-call")
        expect(page.locator("#sp-status")).to_have_text("connected", timeout=30_000)
        expect(key0).to_be_enabled(timeout=30_000)  # the keypad channel is open
        call_id = page.inner_text("#sp-callid")

        page.evaluate("() => window.voicebotSoftphone.dc.send('A')")  # past the page's own check
        expect(page.locator("#toast")).to_contain_text("not a keypad key", timeout=10_000)
        expect(page.locator("#sp-status")).to_have_text("connected")

        key0.click()
        expect(page.locator("#sp-keys")).to_have_text("0")
        expect(page.locator('#sp-events li[data-type="dtmf"]')).to_contain_text("pressed 0", timeout=20_000)
        expect(page.locator('#sp-events li[data-type="transfer"]')).to_contain_text("transfer to general",
                                                                                    timeout=30_000)
        shot(page, "qa2-softphone-keypad")
        expect(page.locator("#sp-status")).to_contain_text("ended", timeout=60_000)
        expect(key0).to_be_disabled()
        browser.close()

    rec = wait_ended(bot, call_id, timeout_s=60)
    types = [e["type"] for e in rec["events"]]
    assert [e["digit"] for e in rec["events"] if e["type"] == "dtmf"] == ["0"], types  # 'A' never got there
    transfer = next(e for e in rec["events"] if e["type"] == "transfer")
    assert transfer["target"] == "general" and transfer["ok"] is False, transfer
    assert rec["record"]["outcome"] == "transfer_failed", rec["record"]
    assert webrtc_metric(bot, "voicebot_errors_total", kind="bad_dtmf") == bad0 + 1
    assert any("webrtc_dtmf_refused" in line and call_id in line for line in bot.logs().splitlines())


async def test_a_call_that_never_connects_leaves_a_record(bot: BotServer) -> None:
    """A softphone call whose ICE never completes (firewall, NAT without TURN) used to leave nothing: no call
    record for the admin to look up and no voicebot_calls_total entry, only an error counter. It now has a
    record with outcome error:connect_timeout (like SIP's error:no_ack) and is counted; no conversation ran
    (no greeting, not counted as started)."""
    outcome = {"outcome": "error:connect_timeout"}
    ended0 = webrtc_metric(bot, "voicebot_calls_total", **outcome)
    started0 = webrtc_metric(bot, "voicebot_calls_started_total")
    peer = RTCPeerConnection()
    peer.addTrack(Tone(1000.0))
    peer.createDataChannel("dtmf")
    await peer.setLocalDescription(await peer.createOffer())
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{bot.url}/admin/api/softphone/offer", headers={"Authorization": f"Bearer {TOKEN}"},
                              json={"sdp": peer.localDescription.sdp, "type": "offer", "version": 1})
    assert r.status_code == 200, r.text
    call_id = r.json()["call_id"]
    # the peer never applies the answer: no ICE checks answered, nothing connects; the bot gives up after 20 s
    try:
        rec = await asyncio.to_thread(wait_ended, bot, call_id, 60)
    finally:
        await peer.close()
    r_ = rec["record"]
    assert r_["outcome"] == "error:connect_timeout" and r_["transport"] == "webrtc", r_
    assert r_["policy_version"] == "v1" and float(r_["duration_s"]) >= 15, r_
    assert [e["type"] for e in rec["events"]] == ["call_started", "connect_failed", "call_ended"], rec["events"]
    assert webrtc_metric(bot, "voicebot_calls_total", **outcome) == ended0 + 1
    assert webrtc_metric(bot, "voicebot_calls_started_total") == started0


async def test_a_resumed_leg_that_never_connects_leaves_the_call_to_be_carried_on(bot: BotServer) -> None:
    """The console carrying a lost call on with a new peer connection that never connects (its network still
    failing) used to end the call there: the leg recorded error:connect_timeout, and the console's next offer was
    refused as call_over although the call was lost seconds before. The call now stays as it was lost, the
    attempt is an event, and the next offer carries it on as the same leg."""
    import redis.asyncio as aioredis

    from bot.state import call_key
    from tests.admin.browser import fetch_record

    call_id = "webrtc-resume-never"
    lost_at = f"{time.time():.3f}"
    r = aioredis.from_url(bot.redis_url, decode_responses=True)
    try:
        await r.hset(call_key(call_id), mapping={"call_id": call_id, "transport": "webrtc",
                                                 "caller": "softphone:admin", "status": "ended",
                                                 "outcome": "worker_lost", "ended_at": lost_at, "leg": "1"})
        ended0 = webrtc_metric(bot, "voicebot_calls_total", outcome="error:connect_timeout")
        failed0 = metric_value(bot.metrics(), "voicebot_errors_total",
                               {"component": "softphone", "kind": "resume_not_connected"})

        async def offer(peer: RTCPeerConnection) -> httpx.Response:
            await peer.setLocalDescription(await peer.createOffer())
            async with httpx.AsyncClient(timeout=30) as client:
                return await client.post(f"{bot.url}/admin/api/softphone/offer",
                                         headers={"Authorization": f"Bearer {TOKEN}"},
                                         json={"sdp": peer.localDescription.sdp, "type": "offer", "version": 1,
                                               "resume": call_id})

        peers = [RTCPeerConnection() for _ in range(3)]
        for p in peers:
            p.addTrack(Tone(1000.0))
            p.createDataChannel("dtmf")
        try:
            first = await offer(peers[0])
            assert first.status_code == 200 and first.json()["leg"] == 2, first.text
            busy = await offer(peers[1])  # that leg is being set up: the console tries again shortly
            assert busy.status_code == 409 and busy.json()["detail"]["kind"] == "call_live", busy.text
            # the first peer never applies the answer: nothing connects; the bot gives up after 20 s
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                rec = await asyncio.to_thread(fetch_record, bot, call_id)
                if rec and any(e["type"] == "resume_failed" for e in rec["events"]):
                    break
                await asyncio.sleep(0.5)
            else:
                raise AssertionError(f"no resume_failed event: {rec}")
            record = rec["record"]
            assert (record["status"], record["outcome"], record["ended_at"], record.get("leg")) == \
                ("ended", "worker_lost", lost_at, "1"), record
            failed = next(e for e in rec["events"] if e["type"] == "resume_failed")
            assert failed["leg"] == 2 and failed["reason"] == "error:connect_timeout", failed
            assert webrtc_metric(bot, "voicebot_calls_total", outcome="error:connect_timeout") == ended0
            assert metric_value(bot.metrics(), "voicebot_errors_total",
                                {"component": "softphone", "kind": "resume_not_connected"}) == failed0 + 1
            again = await offer(peers[2])
            assert again.status_code == 200 and again.json()["leg"] == 2, again.text
        finally:
            for p in peers:
                await p.close()
    finally:
        await r.aclose()


def test_console_says_when_a_call_never_connects(bot: BotServer, silence_wav: Path) -> None:
    """The console's view of a call whose ICE cannot complete (here: the answer's ICE password is garbled on
    its way to the browser, so neither side accepts the other's checks). The page used to stop polling 10 s
    after its side gave up, while the bot's side ends only at its 20 s connect timeout (and left no record
    anyway): the admin saw a bare "failed" or nothing. It now shows the call's outcome and why."""
    import re

    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = launch(pw, FAKE_MIC + [f"--use-file-for-fake-audio-capture={silence_wav}"])
        page = open_softphone(browser, bot, TOKEN)

        def garble(route: Any) -> None:
            resp = route.fetch()
            body = resp.json()
            body["sdp"] = re.sub(r"a=ice-pwd:(\S+)", lambda m: "a=ice-pwd:" + "x" * len(m.group(1)), body["sdp"])
            route.fulfill(response=resp, json=body)

        page.route("**/admin/api/softphone/offer", garble)
        page.click("#sp-call")
        expect(page.locator("#sp-callid")).to_contain_text("webrtc-", timeout=30_000)
        call_id = page.inner_text("#sp-callid")
        expect(page.locator("#sp-status")).to_contain_text("ended: error:", timeout=90_000)
        expect(page.locator('#sp-events li[data-type="connect_failed"]')).to_contain_text("never connected")
        expect(page.locator('#sp-keypad button[data-key="1"]')).to_be_disabled()
        expect(page.locator("#sp-call")).to_be_enabled()
        shot(page, "qa2-softphone-never-connected")
        browser.close()
    rec = wait_ended(bot, call_id, timeout_s=60)
    assert rec["record"]["outcome"] in ("error:connect_timeout", "error:ice_failed"), rec["record"]
    assert "call_ended" in [e["type"] for e in rec["events"]]
