"""The softphone's endings as an admin meets them, in Debian's Chromium against a live `bot serve` (queues open
around the clock): hanging up or closing the tab while the call is still connecting is the caller's hang-up,
not a connect timeout (the page withdraws its offer: POST /softphone/offer with type "rollback"), while a call
that really never connects stays error:connect_timeout; the rollback also reaches a call held by another worker
(through Redis); a page reloaded mid-call ends its call; a call made with the editor's draft keeps that draft
while another admin publishes; a call left open ends at the bot's maximum call length and the browser lets go.

To hold a call in "connecting" for as long as a test needs, the page's fetch holds the bot's answer to the offer
(the bot has the call, the browser has not applied the answer yet) until the test releases it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import redis
from aiortc import RTCPeerConnection

from bot.admin.softphone import ROLLBACK_KEY, offer_key
from tests.admin.browser import FAKE_MIC, fetch_record, launch, open_softphone, shot, start_softphone_bot, wait_ended
from tests.helpers.webrtc_tone import Tone
from tests.helpers.bot import open_policy
from tests.helpers.server import BotServer, metric_value

TOKEN = "softphone-qa3-publisher-token"
MAX_CALL_S = 40  # the longest a call may last here (BOT_MAX_CALL_S); the other tests' calls end well before
CONNECT_TIMEOUT_S = 20  # telephony.webrtc.WebRTCCallBridge's default
pytestmark = pytest.mark.slow

# The page's fetch, wrapped: the answer to an offer is held until window.__releaseAnswer() (its call id is in
# window.__heldCallId meanwhile); the status of a rollback is kept in window.__rollbackStatus.
HOLD_ANSWER = """(() => {
  const realFetch = window.fetch;
  window.fetch = async function (input, init) {
    const url = String(input instanceof Request ? input.url : input);
    const body = init && typeof init.body === "string" ? init.body : "";
    const res = await realFetch.call(window, input, init);
    if (url.endsWith("/softphone/offer") && body.includes('"type":"rollback"')) window.__rollbackStatus = res.status;
    if (url.endsWith("/softphone/offer") && body.includes('"type":"offer"') && res.ok) {
      window.__heldCallId = (await res.clone().json()).call_id;
      await new Promise((resolve) => { window.__releaseAnswer = resolve; });
    }
    return res;
  };
})();"""

PHONE = """() => { const p = window.voicebotSoftphone; return p && {
    pc: p.pc ? p.pc.connectionState : null,
    mic: p.stream ? p.stream.getTracks().map((t) => t.readyState) : [],
    callDisabled: document.querySelector('#sp-call').disabled,
    status: document.querySelector('#sp-status').textContent }; }"""


@pytest.fixture(scope="module")
def bot(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotServer]:
    tmp = tmp_path_factory.mktemp("qa3-softphone")
    env = {"BOT_NO_INPUT_S": "60", "BOT_MAX_CALL_S": str(MAX_CALL_S), "BOT_POLICY": str(open_policy(tmp / "open.yaml"))}
    srv = start_softphone_bot(redis_url, tmp, TOKEN, env)
    try:
        yield srv
    finally:
        srv.stop()


def webrtc_calls(bot: BotServer, outcome: str) -> float:
    return metric_value(bot.metrics(), "voicebot_calls_total", {"transport": "webrtc", "outcome": outcome})


def webrtc_errors(bot: BotServer, kind: str) -> float:
    return metric_value(bot.metrics(), "voicebot_errors_total", {"component": "webrtc", "kind": kind})


def webrtc_started(bot: BotServer) -> float:
    return metric_value(bot.metrics(), "voicebot_calls_started_total", {"transport": "webrtc"})


def held_softphone(browser: Any, bot: BotServer) -> Any:
    """The Softphone tab on a page that holds the bot's answer to its offer."""
    return open_softphone(browser, bot, TOKEN, init_script=HOLD_ANSWER)


def call_until_held(page: Any) -> str:
    """Click Call; returns the call id once the bot has answered the offer (the page still waits for it)."""
    from playwright.sync_api import expect

    page.click("#sp-call")
    page.wait_for_function("() => !!window.__heldCallId", timeout=30_000)
    expect(page.locator("#sp-status")).to_have_text("connecting")
    return str(page.evaluate("window.__heldCallId"))


def assert_hung_up_before_connecting(bot: BotServer, rec: dict, before: dict[str, float]) -> None:
    r = rec["record"]
    assert r["outcome"] == "caller_hangup" and r["transport"] == "webrtc" and r["policy_version"] == "v1", r
    # ended by the rollback, not by the bot's connect timeout
    assert float(r["duration_s"]) < CONNECT_TIMEOUT_S - 5, r
    assert [e["type"] for e in rec["events"]] == ["call_started", "connect_failed", "call_ended"], rec["events"]
    failed = next(e for e in rec["events"] if e["type"] == "connect_failed")
    assert failed["reason"] == "hangup", failed
    assert webrtc_calls(bot, "caller_hangup") == before["hangup"] + 1
    assert webrtc_calls(bot, "error:connect_timeout") == before["timeout"]
    assert webrtc_errors(bot, "connect_timeout") == before["timeout_errors"]
    assert webrtc_started(bot) == before["started"]  # no conversation ran


def counters(bot: BotServer) -> dict[str, float]:
    return {"hangup": webrtc_calls(bot, "caller_hangup"), "timeout": webrtc_calls(bot, "error:connect_timeout"),
            "timeout_errors": webrtc_errors(bot, "connect_timeout"), "started": webrtc_started(bot)}


def test_hang_up_while_connecting_is_a_caller_hangup(bot: BotServer, silence_wav: Path) -> None:
    """The admin clicks Hang up while the call is still connecting. Chrome tells the bot nothing when a peer
    connection that never connected is closed, so the bot waited out its 20 s connect timeout and recorded
    error:connect_timeout (and counted a connect_timeout error): a network fault on the dashboards for what was
    the admin's own hang-up. The page now withdraws its offer; the call ends at once as caller_hangup."""
    from playwright.sync_api import expect, sync_playwright

    before = counters(bot)
    with sync_playwright() as pw:
        browser = launch(pw, FAKE_MIC + [f"--use-file-for-fake-audio-capture={silence_wav}"])
        page = held_softphone(browser, bot)
        call_id = call_until_held(page)
        page.click("#sp-hangup")
        expect(page.locator("#sp-call")).to_be_enabled()
        rec = wait_ended(bot, call_id, timeout_s=CONNECT_TIMEOUT_S - 5)
        assert page.evaluate("window.__rollbackStatus") == 200
        assert page.evaluate(PHONE)["mic"] == []  # the microphone is released

        # the answer arrives after the hang-up: the page shows the call and its outcome, and stays hung up
        page.evaluate("window.__releaseAnswer()")
        expect(page.locator("#sp-callid")).to_have_text(call_id, timeout=10_000)
        expect(page.locator("#sp-status")).to_have_text("ended: caller_hangup", timeout=10_000)
        expect(page.locator('#sp-events li[data-type="connect_failed"]')).to_contain_text("you hung up before")
        state = page.evaluate(PHONE)
        assert state["mic"] == [] and state["pc"] == "closed" and not state["callDisabled"], state
        shot(page, "qa3-softphone-hung-up-while-connecting")
        browser.close()
    assert_hung_up_before_connecting(bot, rec, before)


def test_tab_closed_while_connecting_is_a_caller_hangup(bot: BotServer, silence_wav: Path) -> None:
    """The admin closes the tab while the call is connecting: the page withdraws its offer on pagehide (a
    keepalive request, sent as the page goes), and the call is the caller's hang-up, not a connect timeout."""
    from playwright.sync_api import sync_playwright

    before = counters(bot)
    with sync_playwright() as pw:
        browser = launch(pw, FAKE_MIC + [f"--use-file-for-fake-audio-capture={silence_wav}"])
        page = held_softphone(browser, bot)
        call_id = call_until_held(page)
        page.close()
        rec = wait_ended(bot, call_id, timeout_s=CONNECT_TIMEOUT_S - 5)
        browser.close()
    assert_hung_up_before_connecting(bot, rec, before)


def test_a_call_that_never_connects_stays_a_connect_timeout(bot: BotServer, silence_wav: Path) -> None:
    """The same call, but nobody hangs up: the browser never applies the answer in time, so the bot gives up at
    its connect timeout. That is error:connect_timeout (the withdrawal must not swallow real failures), and the
    console says so once the call id reaches it."""
    from playwright.sync_api import expect, sync_playwright

    before = counters(bot)
    with sync_playwright() as pw:
        browser = launch(pw, FAKE_MIC + [f"--use-file-for-fake-audio-capture={silence_wav}"])
        page = held_softphone(browser, bot)
        call_id = call_until_held(page)
        rec = wait_ended(bot, call_id, timeout_s=60)
        page.evaluate("window.__releaseAnswer()")
        expect(page.locator("#sp-status")).to_have_text("ended: error:connect_timeout", timeout=30_000)
        expect(page.locator('#sp-events li[data-type="connect_failed"]')).to_contain_text("never connected")
        assert page.evaluate("window.__rollbackStatus") is None  # nothing was withdrawn
        browser.close()
    r = rec["record"]
    assert r["outcome"] == "error:connect_timeout" and float(r["duration_s"]) >= CONNECT_TIMEOUT_S - 5, r
    assert webrtc_calls(bot, "error:connect_timeout") == before["timeout"] + 1
    assert webrtc_calls(bot, "caller_hangup") == before["hangup"]


async def _offer(bot: BotServer) -> tuple[RTCPeerConnection, str, str]:
    """A browser-like aiortc peer's offer to the bot, never completed: (peer, its SDP, the call id)."""
    peer = RTCPeerConnection()
    peer.addTrack(Tone(1000.0))
    peer.createDataChannel("dtmf")
    await peer.setLocalDescription(await peer.createOffer())
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(f"{bot.url}/admin/api/softphone/offer", headers={"Authorization": f"Bearer {TOKEN}"},
                              json={"sdp": peer.localDescription.sdp, "type": "offer", "version": 1})
    assert r.status_code == 200, r.text
    return peer, peer.localDescription.sdp, r.json()["call_id"]


async def _rollback(bot: BotServer, sdp: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(f"{bot.url}/admin/api/softphone/offer", headers={"Authorization": f"Bearer {TOKEN}"},
                                 json={"sdp": sdp, "type": "rollback"})


async def test_a_rollback_ends_the_call_here_or_on_another_worker(bot: BotServer) -> None:
    """The rollback endpoint itself: on the worker that holds the call it ends the call at once; one that
    reached another worker is left in Redis, where the holding worker finds it while the call connects (here
    the key is written as that other worker would). A rollback that names no offer is refused clearly."""
    before = counters(bot)
    peer, sdp, call_id = await _offer(bot)
    try:
        r = await _rollback(bot, sdp)
        assert r.status_code == 200 and r.json() == {"type": "rollback", "call_id": call_id, "status": "ended"}, r.text
        rec = await asyncio.to_thread(wait_ended, bot, call_id, 10)
    finally:
        await peer.close()
    assert rec["record"]["outcome"] == "caller_hangup", rec["record"]

    peer, sdp, call_id = await _offer(bot)
    key = ROLLBACK_KEY.format(offer_key(sdp))
    r_ = redis.Redis.from_url(bot.redis_url)
    try:
        r_.set(key, "admin", ex=60)  # BOT_ADMIN_TOKEN's principal is "admin"
        rec = await asyncio.to_thread(wait_ended, bot, call_id, 10)
    finally:
        r_.delete(key)
        r_.close()
        await peer.close()
    assert rec["record"]["outcome"] == "caller_hangup", rec["record"]
    assert webrtc_calls(bot, "caller_hangup") == before["hangup"] + 2
    assert webrtc_errors(bot, "connect_timeout") == before["timeout_errors"]

    bad0 = metric_value(bot.metrics(), "voicebot_errors_total", {"component": "softphone", "kind": "bad_rollback"})
    r = await _rollback(bot, "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n")
    assert r.status_code == 400 and "a=ice-ufrag and a=ice-pwd" in r.text, r.text
    assert metric_value(bot.metrics(), "voicebot_errors_total",
                        {"component": "softphone", "kind": "bad_rollback"}) == bad0 + 1
    # an offer this worker never saw (or has forgotten): relayed, nothing to end here
    r = await _rollback(bot, "v=0\r\na=ice-ufrag:abcd\r\na=ice-pwd:0123456789abcdefghijkl\r\nm=audio 9 RTP/AVP 0\r\n")
    assert r.status_code == 200 and r.json()["status"] == "requested", r.text


def test_page_reloaded_mid_call_ends_the_call(bot: BotServer, silence_wav: Path) -> None:
    """The admin reloads the console mid-call: the old call must not linger live (talking to nobody until its
    no-input prompts or the media timeout run out); it ends as the caller's hang-up, and the reloaded page can
    call again."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = launch(pw, FAKE_MIC + [f"--use-file-for-fake-audio-capture={silence_wav}"])
        page = open_softphone(browser, bot, TOKEN)
        page.click("#sp-call")
        expect(page.locator("#sp-status")).to_have_text("connected", timeout=30_000)
        first = page.inner_text("#sp-callid")
        page.reload()
        rec = wait_ended(bot, first, timeout_s=8)  # the media timeout (10 s) would say "abandoned"
        assert rec["record"]["outcome"] == "caller_hangup", rec["record"]

        # the token survives the reload (sessionStorage): straight back to the softphone
        expect(page.locator("#who")).to_contain_text("publisher", timeout=10_000)
        page.click('#tabs button[data-tab="softphone"]')
        page.select_option("#sp-policy", "v1")
        page.click("#sp-call")
        expect(page.locator("#sp-status")).to_have_text("connected", timeout=30_000)
        second = page.inner_text("#sp-callid")
        assert second != first
        page.click("#sp-hangup")
        rec = wait_ended(bot, second, timeout_s=8)
        browser.close()
    assert rec["record"]["outcome"] == "caller_hangup", rec["record"]


def test_draft_call_keeps_its_policy_while_another_admin_publishes(bot: BotServer, silence_wav: Path) -> None:
    """An admin calls the editor's (unsaved) draft; meanwhile another admin publishes a new version. The call
    goes on under the draft it started with (a call keeps its policy); the picker offers the new version
    without a tab switch, and a call on it gets it."""
    from playwright.sync_api import expect, sync_playwright

    auth = {"Authorization": f"Bearer {TOKEN}"}
    with sync_playwright() as pw:
        browser = launch(pw, FAKE_MIC + [f"--use-file-for-fake-audio-capture={silence_wav}"])
        page = open_softphone(browser, bot, TOKEN, policy=None)
        options = page.eval_on_selector_all("#sp-policy option", "os => os.map((o) => o.value)")
        assert "editor" in options, options
        page.select_option("#sp-policy", "editor")
        page.click("#sp-call")
        expect(page.locator("#sp-status")).to_have_text("connected", timeout=30_000)
        call_id = page.inner_text("#sp-callid")
        rec = fetch_record(bot, call_id)
        assert rec is not None and rec["record"]["policy_version"] == "unsaved draft", rec

        current = httpx.get(f"{bot.url}/admin/api/policies", headers=auth, timeout=10).json()["current"]
        yaml_text = httpx.get(f"{bot.url}/admin/api/policies/{current}", headers=auth, timeout=10).json()["yaml"]
        r = httpx.post(f"{bot.url}/admin/api/publish", headers=auth, timeout=60,
                       json={"yaml": yaml_text, "comment": "qa3: published mid-call", "expected_version": current})
        assert r.status_code == 200, r.text
        new = r.json()["version"]
        assert new == current + 1

        page.wait_for_timeout(2000)  # the publish reaches the worker over pub/sub (docs: within a second)
        rec = fetch_record(bot, call_id)
        assert rec["record"]["status"] == "active" and rec["record"]["policy_version"] == "unsaved draft", rec
        expect(page.locator("#sp-status")).to_have_text("connected")
        page.click("#sp-hangup")
        rec = wait_ended(bot, call_id, timeout_s=8)
        assert rec["record"]["outcome"] == "caller_hangup", rec["record"]

        # the softphone's picker follows the publish without leaving the tab (it used to offer the new version,
        # and mark it live, only after a tab switch); the next call on it gets the new version
        expect(page.locator(f'#sp-policy option[value="v{new}"]')).to_have_text(f"v{new} (live)", timeout=15_000)
        page.select_option("#sp-policy", f"v{new}")
        page.click("#sp-call")
        expect(page.locator("#sp-status")).to_have_text("connected", timeout=30_000)
        second = page.inner_text("#sp-callid")
        page.click("#sp-hangup")
        browser.close()
    assert wait_ended(bot, second, timeout_s=8)["record"]["policy_version"] == f"v{new}"


def test_a_call_left_open_ends_at_the_maximum_length(bot: BotServer, silence_wav: Path) -> None:
    """An admin leaves a call open (muted, walked away, with no-input prompts far off): the bot ends it at
    BOT_MAX_CALL_S, outcome max_duration, and the browser lets go of the call and the microphone."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = launch(pw, FAKE_MIC + [f"--use-file-for-fake-audio-capture={silence_wav}"])
        page = open_softphone(browser, bot, TOKEN)
        page.click("#sp-call")
        expect(page.locator("#sp-status")).to_have_text("connected", timeout=30_000)
        call_id = page.inner_text("#sp-callid")
        rec = wait_ended(bot, call_id, timeout_s=MAX_CALL_S + 30)
        expect(page.locator("#sp-status")).to_have_text("ended: max_duration", timeout=20_000)
        state = page.evaluate(PHONE)
        assert state["mic"] == [] and state["pc"] == "closed" and not state["callDisabled"], state
        browser.close()
    r = rec["record"]
    assert r["outcome"] == "max_duration", r
    assert MAX_CALL_S - 1 <= float(r["duration_s"]) <= MAX_CALL_S + 15, r
