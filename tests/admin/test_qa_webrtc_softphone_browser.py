"""The console softphone as an admin meets it, in Debian's Chromium against a live `bot serve`: the
microphone refused, the bot hanging up (the browser must let go of the call and the microphone), two
softphone calls at once from two browsers, a network blip, and offers the signalling endpoint must refuse
with a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.admin.browser import FAKE_MIC, launch, open_softphone, shot, start_softphone_bot, wait_ended
from tests.helpers.server import BotServer, metric_value

TOKEN = "softphone-qa-publisher-token"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bot(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotServer]:
    # a silent caller meets two short no-input prompts and the goodbye: the bot hangs up in ~15 s
    srv = start_softphone_bot(redis_url, tmp_path_factory.mktemp("qa-softphone"), TOKEN, {"BOT_NO_INPUT_S": "2"})
    try:
        yield srv
    finally:
        srv.stop()


PHONE = """() => { const p = window.voicebotSoftphone; return p && {
    pc: p.pc ? p.pc.connectionState : null,
    mic: p.stream ? p.stream.getTracks().map((t) => t.readyState) : [],
    callDisabled: document.querySelector('#sp-call').disabled,
    status: document.querySelector('#sp-status').textContent }; }"""


def test_microphone_denied_is_said_plainly(bot: BotServer) -> None:
    """A refused microphone showed the browser's bare DOMException ("Softphone: Permission denied"); the
    page now says what happened and what to do, and the Call button works again."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = launch(pw, ["--use-fake-device-for-media-stream"])  # no fake UI: the permission prompt is refused
        context = browser.new_context()
        context.clear_permissions()
        page = context.new_page()
        page.goto(f"{bot.url}/admin")
        page.fill("#token", TOKEN)
        page.click("#login-form button[type=submit]")
        expect(page.locator("#who")).to_contain_text("publisher")
        page.click('#tabs button[data-tab="softphone"]')
        page.click("#sp-call")
        expect(page.locator("#toast")).to_contain_text("Microphone access was denied", timeout=20_000)
        expect(page.locator("#sp-call")).to_be_enabled()
        expect(page.locator("#sp-hangup")).to_be_disabled()
        shot(page, "qa-webrtc-mic-denied")
        browser.close()


def test_bot_hangs_up_on_two_browsers_at_once(bot: BotServer, silence_wav: Path) -> None:
    """Two admins call at once (two browsers), both stay silent, the bot says goodbye and hangs up on
    each. Both calls are their own records (transport webrtc, outcome no_input, a duration) and counted
    in the metrics; and each browser lets go: its peer connection closes and the microphone is released.
    Before, the bot's hang-up was cancelled half-way (see test_qa_webrtc_bridge), so the browser stayed
    "connected" with its microphone live until the tab was closed."""
    from playwright.sync_api import expect, sync_playwright

    ended0 = metric_value(bot.metrics(), "voicebot_calls_total", {"transport": "webrtc", "outcome": "no_input"})
    with sync_playwright() as pw:
        browsers = [launch(pw, FAKE_MIC + [f"--use-file-for-fake-audio-capture={silence_wav}"]) for _ in range(2)]
        pages = [open_softphone(b, bot, TOKEN, viewport={"width": 1360, "height": 860}) for b in browsers]
        for page in pages:
            page.click("#sp-call")
        ids = []
        for page in pages:
            expect(page.locator("#sp-callid")).to_contain_text("webrtc-", timeout=30_000)
            expect(page.locator("#sp-status")).to_have_text("connected", timeout=30_000)
            ids.append(page.inner_text("#sp-callid"))
        assert ids[0] != ids[1]
        for page in pages:
            assert page.evaluate(PHONE)["mic"] == ["live"]

        # the bot hangs up (no input): each browser closes its side and frees the microphone
        for page in pages:
            page.wait_for_function("() => window.voicebotSoftphone.pc.connectionState === 'closed'", timeout=90_000)
            state = page.evaluate(PHONE)
            assert state["mic"] == [] and not state["callDisabled"], state
            expect(page.locator("#sp-status")).to_contain_text("ended", timeout=10_000)
        shot(pages[0], "qa-webrtc-bot-hung-up")
        for b in browsers:
            b.close()

    for call_id in ids:
        rec = wait_ended(bot, call_id, timeout_s=15)
        r = rec["record"]
        assert r["status"] == "ended" and r["transport"] == "webrtc" and r["outcome"] == "no_input", r
        assert float(r["duration_s"]) > 2
        assert any(e["type"] == "call_ended" for e in rec["events"])
    ended = metric_value(bot.metrics(), "voicebot_calls_total", {"transport": "webrtc", "outcome": "no_input"})
    assert ended == ended0 + 2
    # both peer connections were closed on the bot's side too (the runner's close returned)
    logs = bot.logs()
    for call_id in ids:
        assert any(call_id in line and '"state": "closed"' in line for line in logs.splitlines()), call_id


def test_network_blip_keeps_the_call_and_hang_up_is_a_caller_hangup(bot: BotServer, silence_wav: Path) -> None:
    """ICE "disconnected" is a blip the browser may recover from. The page used to stop the microphone and
    re-enable the Call button on it (the bot then heard silence and ended the call as abandoned, and a
    second click leaked the first peer connection). Now it shows "reconnecting" and keeps the call.
    The Hang up button then ends it as the caller's hang-up (it used to be recorded as abandoned, 10 s
    later, by the bot's media timeout: Chrome's close() sends no BYE)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = launch(pw, FAKE_MIC + [f"--use-file-for-fake-audio-capture={silence_wav}"])
        page = open_softphone(browser, bot, TOKEN, viewport={"width": 1360, "height": 860})
        page.click("#sp-call")
        expect(page.locator("#sp-status")).to_have_text("connected", timeout=30_000)
        page.evaluate("""() => { const pc = window.voicebotSoftphone.pc;
            Object.defineProperty(pc, 'connectionState', { get: () => 'disconnected', configurable: true });
            pc.dispatchEvent(new Event('connectionstatechange')); }""")
        expect(page.locator("#sp-status")).to_contain_text("reconnecting")
        state = page.evaluate(PHONE)
        assert state["mic"] == ["live"] and state["callDisabled"], state
        page.evaluate("""() => { const pc = window.voicebotSoftphone.pc; delete pc.connectionState;
            pc.dispatchEvent(new Event('connectionstatechange')); }""")
        expect(page.locator("#sp-status")).to_have_text("connected")
        call_id = page.inner_text("#sp-callid")
        page.click("#sp-hangup")
        expect(page.locator("#sp-call")).to_be_enabled()
        state = page.evaluate(PHONE)
        assert state["pc"] == "closed" and state["mic"] == [], state
        rec = wait_ended(bot, call_id)
        browser.close()
    assert rec["record"]["outcome"] == "caller_hangup", rec["record"]


def test_signalling_refuses_bad_offers_clearly(bot: BotServer) -> None:
    url = f"{bot.url}/admin/api/softphone/offer"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.post(url, json={"sdp": "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"}, timeout=10).status_code == 401
    r = httpx.post(url, content=b"{not json", headers={**auth, "Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 422
    cases = [
        ("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n", "no audio m-line"),
        ("m=audio\x00\xff" * 10, "could not use the SDP offer"),
        ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n" + "a=candidate:1 1 udp 1 10.0.0.1 9 typ host\r\n" * 500,
         "ICE candidates"),
    ]
    for sdp, message in cases:
        r = httpx.post(url, json={"sdp": sdp, "type": "offer", "version": 1}, headers=auth, timeout=30)
        assert r.status_code == 400, r.text
        assert message in r.text, r.text
    assert httpx.get(f"{bot.url}/readyz", timeout=10).status_code == 200  # the worker is unharmed


def test_tab_closed_mid_call_ends_the_call(bot: BotServer, silence_wav: Path) -> None:
    """The admin closes the console tab mid-call. Chrome tells the bot nothing when a peer connection goes
    away with its page (no RTCP BYE, no DTLS close), so the bot talked on to silence until its media timeout
    and recorded the call as abandoned (and a media_timeout error). The page now hangs up on `pagehide`:
    the call ends at once as the caller's hang-up."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = launch(pw, FAKE_MIC + [f"--use-file-for-fake-audio-capture={silence_wav}"])
        page = open_softphone(browser, bot, TOKEN, viewport={"width": 1360, "height": 860})
        page.click("#sp-call")
        expect(page.locator("#sp-status")).to_have_text("connected", timeout=30_000)
        call_id = page.inner_text("#sp-callid")
        page.close()
        rec = wait_ended(bot, call_id)
        browser.close()
    assert rec["record"]["outcome"] == "caller_hangup", rec["record"]  # the media timeout says "abandoned"
    assert float(rec["record"]["duration_s"]) > 0
