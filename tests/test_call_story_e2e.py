"""A real call through `bot serve` (logging at DEBUG, the level an on-call engineer turns up to investigate)
and the `bot call` simulator: every log line of the call names it, the info lines tell the story in order,
the caller's number and the account number they spoke never reach the logs, and `bot calls show` tells the
same story readably."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers.audio import synth, write_wav
from tests.helpers.bot import AUTH_TOKEN, open_policy, twilio_env
from tests.helpers.fake_twilio import FakeTwilioApi
from tests.helpers.server import ROOT, BotServer, isolated_redis_url

CALLER = "+15550100123"  # what the simulator sends as From


@pytest.fixture(scope="module")
def story_bot(redis_url: str, tmp_path_factory: pytest.TempPathFactory,
              fake_api: FakeTwilioApi) -> Iterator[BotServer]:
    tmp = tmp_path_factory.mktemp("story")
    env = twilio_env(fake_api.url, open_policy(tmp / "policy.yaml"), tmp_path_factory.getbasetemp())
    server = BotServer(isolated_redis_url(redis_url), tmp, env)
    server.env["BOT_LOG_LEVEL"] = "DEBUG"
    with server:
        yield server


def test_a_calls_logs_and_timeline_tell_its_story_without_leaking(story_bot: BotServer, tmp_path: Path) -> None:
    wavs = [write_wav(tmp_path / "acct.wav", synth("my account number is 4 2 7 1 9 9 3 8")),
            write_wav(tmp_path / "agent.wav", synth("agent"))]
    env = {**story_bot.env, "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "REDIS_URL": story_bot.redis_url}
    before = len(story_bot.logs())
    out = subprocess.run([sys.executable, "-m", "bot.cli", "call", "--url", story_bot.url, *map(str, wavs),
                          "--reply-timeout", "20"], capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    sid = json.loads(out.stdout)["call_sid"]
    # the call's record is written when the bot hangs up after the transfer: wait for its last line
    import time

    deadline = time.monotonic() + 60
    while '"call_ended"' not in story_bot.logs()[before:] and time.monotonic() < deadline:
        time.sleep(0.5)
    lines = [json.loads(x) for x in story_bot.logs()[before:].splitlines() if x.startswith("{")]
    mine = [e for e in lines if e.get("call_id") == sid]
    assert mine, lines
    # one call in flight: every line from its webhook to its end is about it, and says so
    first = lines.index(mine[0])
    last = max(i for i, e in enumerate(lines) if e.get("call_id") == sid and e.get("event") == "call_ended")
    # (a library's own trace, e.g. httpcore's connection steps at DEBUG, does not know the call; its warnings must)
    ours = ("bot.", "telephony.", "engine.", "policies.", "ops.")
    strays = [e for e in lines[first:last + 1] if e.get("call_id") != sid
              and (e["level"] in ("warning", "error", "critical") or str(e.get("logger", "")).startswith(ours))]
    assert not strays, [(e.get("logger"), e.get("level"), e.get("event")) for e in strays]
    # at DEBUG the websockets wire trace (a line per 20 ms frame) is not there to bury the story
    assert len(lines[first:last + 1]) < 60, len(lines[first:last + 1])
    # the info lines alone tell it, in order
    info = [e["event"] for e in mine if e["level"] == "info"]
    assert info[0] == "webhook" and info[-1] == "call_ended"
    assert "call_started" in info and info.count("turn") >= 2
    transfer = next(e for e in mine if e["event"] == "transfer")
    assert transfer["target"] and "ok" in transfer and transfer["reason"]
    text = story_bot.logs()[before:]
    assert CALLER not in text and CALLER[2:] not in text  # the caller's number
    assert "42719938" not in text and "4 2 7 1 9 9" not in text and "four two seven" not in text
    # the same story, readable
    show = subprocess.run([sys.executable, "-m", "bot.cli", "calls", "show", sid], capture_output=True, text=True,
                          env=env, timeout=60, cwd=ROOT)
    assert show.returncode == 0, show.stderr
    story = show.stdout
    assert "bot said (greeting)" in story and "caller turn 1:" in story and "caller turn 2:" in story
    assert f"transfer to {transfer['target']}:" in story and "call ended:" in story
    assert "42719938" not in story and "four two seven" not in story and CALLER not in story
