"""Softphone: headless Chromium calls a live `bot serve` over WebRTC from the console, its fake
microphone playing an espeak-ng caller (48 kHz WAV). The call runs the normal conversation: it is
in Redis with transport=webrtc, shows in the live view, the bot's voice reaches the browser, and
the caller's turn is understood."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.admin.browser import (FAKE_MIC, espeak_wav_48k, fetch_record, launch, open_softphone, shot,
                                 start_softphone_bot, wait_ended)
from tests.helpers.server import BotServer

TOKEN = "softphone-publisher-token"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bot(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotServer]:
    srv = start_softphone_bot(redis_url, tmp_path_factory.mktemp("softphone"), TOKEN, {"BOT_NO_INPUT_S": "20"})
    try:
        yield srv
    finally:
        srv.stop()


def test_softphone_call_runs_the_conversation(bot: BotServer, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    # greeting plays first (~3 s), then the caller speaks; the fake device loops the file
    wav = espeak_wav_48k("I want to pay my bill", tmp_path / "caller.wav", lead_s=4.5, tail_s=8.0)
    with sync_playwright() as pw:
        browser = launch(pw, FAKE_MIC + [f"--use-file-for-fake-audio-capture={wav}"])
        page = open_softphone(browser, bot, TOKEN, viewport={"width": 1360, "height": 860})
        page.click("#sp-call")
        expect(page.locator("#sp-callid")).to_contain_text("webrtc-", timeout=20_000)
        call_id = page.inner_text("#sp-callid")
        expect(page.locator("#sp-status")).to_have_text("connected", timeout=20_000)

        # the caller's turn reaches the engine and the policy
        deadline = time.monotonic() + 60
        turn = None
        while time.monotonic() < deadline and turn is None:
            rec = fetch_record(bot, call_id)
            if rec:
                turn = next((e for e in rec["events"] if e["type"] == "turn"), None)
            time.sleep(0.5)
        assert rec is not None, "the softphone call left no record in Redis"
        assert rec["record"]["transport"] == "webrtc" and rec["record"]["policy_version"] == "v1"
        assert turn is not None, f"no caller turn recorded: {[e['type'] for e in rec['events']]}"
        expect(page.locator("#sp-events li[data-type=turn]").first).to_be_visible(timeout=10_000)
        shot(page, "10-softphone-in-call")

        # the bot's voice reached the browser (decoded audio with energy on the inbound track)
        stats = page.evaluate("""async () => {
            const r = await window.voicebotSoftphone.pc.getStats();
            for (const s of r.values()) if (s.type === 'inbound-rtp' && s.kind === 'audio')
                return {packets: s.packetsReceived, energy: s.totalAudioEnergy || 0};
            return null; }""")
        assert stats and stats["packets"] > 100 and stats["energy"] > 0, stats

        # it is a live call on the console while it lasts
        page.click('#tabs button[data-tab="live"]')
        row = page.locator(f'#calls-table tr[data-call-id="{call_id}"]')
        if rec["record"].get("status") != "ended":
            expect(row).to_contain_text("webrtc", timeout=10_000)
            shot(page, "11-live-view-webrtc")
        page.click('#tabs button[data-tab="softphone"]')
        page.click("#sp-hangup")
        expect(page.locator("#sp-call")).to_be_enabled()

        # try-it with a recording from the (fake) microphone: the console records a WAV and uploads it
        page.click('#tabs button[data-tab="tryit"]')
        page.click("#btn-record")
        expect(page.locator("#btn-record")).to_have_text("■ Stop")
        page.wait_for_timeout(3000)
        page.click("#btn-record")
        page.wait_for_selector("#try-result:not([hidden]), #toast.error:not([hidden])", timeout=60_000)
        assert page.is_visible("#try-result"), page.inner_text("#toast")
        expect(page.locator("#try-source")).to_contain_text("Your recording")
        expect(page.locator("#try-source")).to_contain_text(re.compile(r"\b[234](\.\d+)?s audio"))
        shot(page, "12-try-it-recording")
        browser.close()

    # hanging up ends the call in Redis
    rec = wait_ended(bot, call_id, timeout_s=15)
    assert turn.get("intent") == "pay_bill", turn  # understood over WebRTC: 48 kHz Opus -> 8 kHz -> engine
