"""Browser-test helpers: Debian's Chromium driven by Playwright (no downloaded browsers), screenshots
under test-results/admin/, and a one-shot Twilio-protocol call that reports its policy version."""

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
