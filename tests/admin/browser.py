"""Browser-test helpers: Debian's Chromium driven by Playwright (no downloaded browsers), screenshots
under test-results/admin/, a one-shot Twilio-protocol call that reports its policy version, and what the
softphone tests share: a `bot serve` to call, the console's Softphone tab, fake-microphone audio, call records."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-results" / "admin"
CHROMIUM = "/usr/bin/chromium"
# Chromium's fake microphone (playing --use-file-for-fake-audio-capture), granted without a prompt
FAKE_MIC = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            "--autoplay-policy=no-user-gesture-required"]
BASE_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def launch(pw: Any, extra_args: list[str] | None = None) -> Any:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is required at /usr/bin/chromium (scripts/setup.sh installs it)")
    return pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=BASE_ARGS + (extra_args or []))


def shot(page: Any, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path


def policy_version_of_next_call(base_url: str, redis_url: str) -> str:
    """Place a short Twilio-protocol call (greeting, hang up) and read its record from Redis."""
    from bot.simulator import TwilioCaller, fetch_call

    async def run() -> str:
        caller = TwilioCaller(base_url)
        await caller.connect()
        try:
            for _ in range(100):  # the record is written as the call starts
                rec = await fetch_call(base_url, caller.call_sid, redis_url)
                if rec and rec["record"].get("policy_version"):
                    return str(rec["record"]["policy_version"])
                await asyncio.sleep(0.1)
            raise AssertionError("the call left no record in Redis")
        finally:
            await caller.hangup()

    return run_async(run())


def policy_version_within(base_url: str, redis_url: str, want: str, within_s: float = 1.0) -> str:
    """The policy version new calls get once a publish or rollback has had `within_s` to reach every worker
    (docs/admin.md: "within a second"; it travels over Redis pub/sub, so not at the instant the console
    says so). Places calls until one gets `want` or the time is up; returns the last version seen."""
    deadline = time.monotonic() + within_s
    while True:
        got = policy_version_of_next_call(base_url, redis_url)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def run_async(coro: Any) -> Any:
    """asyncio.run in a thread: Playwright's sync API already owns this thread's event loop."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


def espeak_wav_48k(text: str, path: Path, lead_s: float = 0.0, tail_s: float = 0.0) -> Path:
    """The caller's voice for Chromium's fake microphone: espeak-ng resampled to 48 kHz by sox,
    padded with silence (the fake device loops the file)."""
    assert shutil.which("espeak-ng") and shutil.which("sox"), "espeak-ng and sox are required"
    import subprocess

    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True, capture_output=True)
    subprocess.run(["sox", str(raw), "-r", "48000", "-c", "1", "-b", "16", str(path), "pad", str(lead_s), str(tail_s)],
                   check=True, capture_output=True)
    return path


def silence_wav_48k(path: Path, seconds: float = 3.0) -> Path:
    """A silent caller for Chromium's fake microphone (48 kHz mono; the fake device loops it)."""
    assert shutil.which("sox"), "sox is required"
    import subprocess

    subprocess.run(["sox", "-n", "-r", "48000", "-c", "1", "-b", "16", str(path), "trim", "0", str(seconds)],
                   check=True, capture_output=True)
    return path


def start_softphone_bot(redis_url: str, tmp: Path, token: str, env: dict[str, str] | None = None) -> Any:
    """`bot serve` for softphone tests: its own Redis DB, `token` as the publisher's. A worker is ready about
    14 s after a cold start (prompts render in the background after that); the helper's 180 s default leaves
    a busy 2-core box room."""
    from tests.helpers.server import BotServer, isolated_redis_url

    return BotServer(isolated_redis_url(redis_url), tmp, env={"BOT_ADMIN_TOKEN": token, **(env or {})}).start()


def open_softphone(browser: Any, bot: Any, token: str, policy: str | None = "v1",
                   viewport: dict[str, int] | None = None, init_script: str | None = None) -> Any:
    """A new page logged in to the console as the publisher `token`, on the Softphone tab with `policy`
    picked (None: the picker's default); `init_script` runs in the page before the console's own scripts."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport=viewport or {"width": 1360, "height": 900})
    if init_script:
        page.add_init_script(init_script)
    page.goto(f"{bot.url}/admin")
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#who")).to_contain_text("publisher")
    page.click('#tabs button[data-tab="softphone"]')
    if policy is not None:
        page.select_option("#sp-policy", policy)
    return page


def fetch_record(bot: Any, call_id: str) -> dict[str, Any] | None:
    """A call's record and events from the bot's Redis (None until it has one)."""
    from bot.simulator import fetch_call

    return run_async(fetch_call(bot.url, call_id, bot.redis_url))


def wait_ended(bot: Any, call_id: str, timeout_s: float = 40.0) -> dict[str, Any]:
    """The call's record and events once its record says ended; fails after `timeout_s`."""
    rec = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rec = fetch_record(bot, call_id)
        if rec and rec["record"].get("status") == "ended":
            return rec
        time.sleep(0.25)
    raise AssertionError(f"call {call_id} not ended within {timeout_s} s: {rec}")
