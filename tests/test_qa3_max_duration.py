"""A call that reaches BOT_MAX_CALL_S is told why before the bot hangs up (it used to end in silence), over Twilio
against a real `bot serve`, Redis and the local Twilio REST fake."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bot.conversation import MAX_DURATION_TEXT
from ops.load.spawn import SHARED_VOICE_CACHE
from tests.helpers.bot import open_policy, place_call, twilio_env, wait_outcome
from tests.helpers.fake_twilio import FakeTwilioApi
from tests.helpers.server import BotServer, isolated_redis_url

pytestmark = pytest.mark.slow
MAX_CALL_S = 8.0


async def test_a_call_at_its_time_limit_hears_why_then_ends(redis_url: str, tmp_path: Path,
                                                            tmp_path_factory: pytest.TempPathFactory,
                                                            fake_api: FakeTwilioApi) -> None:
    base = tmp_path_factory.getbasetemp()
    if SHARED_VOICE_CACHE.exists() and not (base / "shared-data" / "voice-cache").exists():
        shutil.copytree(SHARED_VOICE_CACHE, base / "shared-data" / "voice-cache")
    env = twilio_env(fake_api.url, open_policy(tmp_path / "p.yaml"), base, BOT_MAX_CALL_S=str(MAX_CALL_S))
    server = BotServer(isolated_redis_url(redis_url), tmp_path, env).start(timeout_s=300)
    try:
        caller = await place_call(server.url)
        assert await caller.wait_bot_quiet(quiet_s=0.3, timeout_s=30)  # the greeting, then silence
        before = caller.play.played_samples
        assert await caller.wait_ended(MAX_CALL_S + 20)
        heard_s = (caller.play.played_samples - before) / 8000
        await caller.close()
        got = await wait_outcome(server.redis_url, caller.call_sid, 5)
        assert got["record"]["outcome"] == "max_duration", got["record"]
        said = [e for e in got["events"] if e["type"] == "prompt_heard" and e["kind"] == "max_duration"]
        assert len(said) == 1 and said[0]["text"] == MAX_DURATION_TEXT and not said[0]["interrupted"], said
        assert heard_s >= 2.0, heard_s  # the caller got the audio of it, not silence
    finally:
        server.stop()
