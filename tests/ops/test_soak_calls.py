"""The on-call engineer's week in a minute: one real `bot serve` (real Redis, fake Twilio REST) takes
batches of simulated Twilio calls that end every way a call can (caller hangs up, hangs up mid-prompt,
socket vanishes, clean close without `stop`, transfer, DTMF, a flood of junk messages, a socket that never
sends `start`). After a warm-up batch nothing may grow with the number of calls: open file descriptors,
threads, asyncio tasks, Prometheus series, live-call index entries, Redis keys without a TTL; RSS and log
lines per call stay within loose bounds. Bounds are per call, never timings."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Iterator

import numpy as np
import pytest
import redis
import websockets

from telephony.twilio.server import START_TIMEOUT_S
from tests.helpers.audio import silence, synth
from tests.helpers.bot import ACCOUNT_SID, AUTH_TOKEN, open_policy, place_call, twilio_env
from tests.helpers.fake_twilio import FakeTwilioApi
from tests.helpers.server import BotServer, isolated_redis_url, metric_value

pytestmark = pytest.mark.slow

KINDS = ("hangup", "vanish", "close", "hangup_mid_prompt", "dtmf_transfer", "junk", "speak")
# keys that live for the worker's lifetime, not per call (docs/state.md); anything else needs a TTL
LONG_LIVED = re.compile(r"^(calls:recent|calls:live|calls:live:info|workers|\{policy\}:.*)$")


@pytest.fixture(scope="module")
def bot(redis_url: str, tmp_path_factory: pytest.TempPathFactory, fake_api: FakeTwilioApi) -> Iterator[BotServer]:
    tmp = tmp_path_factory.mktemp("soak")
    env = twilio_env(fake_api.url, open_policy(tmp / "policy.yaml"), tmp_path_factory.getbasetemp())
    server = BotServer(isolated_redis_url(redis_url), tmp, env)
    server.start(timeout_s=300)  # first server of a session renders the prompts: minutes on a busy 2-core box
    try:
        yield server
    finally:
        server.stop()


def _gauges(bot: BotServer) -> dict[str, float]:
    text = bot.metrics()
    series = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    return {"fds": metric_value(text, "voicebot_worker_open_fds"),
            "threads": metric_value(text, "voicebot_worker_threads"),
            "tasks": metric_value(text, "voicebot_worker_asyncio_tasks"),
            "rss_mb": metric_value(text, "voicebot_worker_resident_memory_bytes") / 2**20,
            "active": metric_value(text, "voicebot_active_calls"),
            "series": float(len(series))}


async def _one(bot: BotServer, kind: str, speech: np.ndarray) -> None:
    caller = await place_call(bot.url)
    try:
        if kind in ("vanish", "close"):
            await asyncio.sleep(0.3)  # mid-greeting
            await (caller.vanish() if kind == "vanish" else caller.close())
            return
        await caller.wait_bot_quiet(quiet_s=0.4, timeout_s=20)
        if kind == "hangup_mid_prompt":
            await caller.say(speech, "s", wait_reply_s=0.3)
        elif kind == "speak":
            await caller.say(speech, "s", wait_reply_s=15)
        elif kind == "dtmf_transfer":
            await caller.send_dtmf("0")
            await caller.wait_ended(10)
        elif kind == "junk":
            for i in range(60):  # counted always, recorded and logged only a few times
                await caller.send_raw(json.dumps({"event": f"future{i % 3}", "streamSid": caller.stream_sid}))
            await caller.send_raw(json.dumps({"event": "start", "streamSid": caller.stream_sid,
                                              "start": {"streamSid": caller.stream_sid, "callSid": caller.call_sid}}))
            await asyncio.sleep(0.3)
        await caller.hangup()
    finally:
        await caller.close()


async def _mute_socket(bot: BotServer) -> bool:
    """A WebSocket that says `connected` and then nothing: the bot must close it (after
    telephony.twilio.server.START_TIMEOUT_S), not hold it forever."""
    url = bot.url.replace("http", "ws") + "/twilio/stream"
    from twilio.request_validator import RequestValidator

    sig = RequestValidator(AUTH_TOKEN).compute_signature(url.replace("ws://", "wss://", 1), {})
    async with websockets.connect(url, additional_headers={"X-Twilio-Signature": sig}) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        try:
            await asyncio.wait_for(ws.recv(), timeout=START_TIMEOUT_S + 15)
        except websockets.ConnectionClosed:
            return True
        except asyncio.TimeoutError:
            return False
    return False


async def _batch(bot: BotServer, n: int, speech: np.ndarray) -> None:
    sem = asyncio.Semaphore(7)

    async def run(i: int) -> None:
        async with sem:
            await _one(bot, KINDS[i % len(KINDS)], speech)

    res = await asyncio.gather(*(run(i) for i in range(n)), _mute_socket(bot), return_exceptions=True)
    errors = [r for r in res if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert res[-1] is True, "a socket that never sent `start` was not closed"


async def _settled(bot: BotServer, r: redis.Redis, timeout_s: float = 30.0) -> dict[str, float]:
    """Gauges once every call has ended and the next process sample (every 5 s) has been taken."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        g = _gauges(bot)
        if (g["active"] == 0 and r.zcard("calls:live") == 0) or asyncio.get_running_loop().time() > deadline:
            await asyncio.sleep(1.0)
            return _gauges(bot)
        await asyncio.sleep(0.5)


async def test_nothing_grows_per_call(bot: BotServer) -> None:
    r = redis.Redis.from_url(bot.redis_url, decode_responses=True)
    speech = np.concatenate([synth("I want to pay my bill"), silence(900)])  # trailing silence ends the turn
    await _batch(bot, 7, speech)  # warm-up: lazy imports, first renders, allocator pools
    warm = await _settled(bot, r)
    logs_warm = len(bot.logs().splitlines())
    n = 21
    await _batch(bot, n, speech)
    after = await _settled(bot, r)
    logs_after = len(bot.logs().splitlines())

    assert after["active"] == 0 and r.zcard("calls:live") == 0 and r.hlen("calls:live:info") == 0
    # fds/threads/tasks are back to where they were after warm-up (small slack: a sample taken mid-cleanup)
    assert after["fds"] <= warm["fds"] + 4, (warm, after)
    assert after["threads"] <= warm["threads"] + 2, (warm, after)
    assert after["tasks"] <= warm["tasks"] + 3, (warm, after)
    # no call id, number or stream id in any label: the series count does not move with the calls
    assert after["series"] <= warm["series"] + 12, (warm, after)
    text = bot.metrics()
    assert "CA" not in "".join(ln for ln in text.splitlines() if "{" in ln and not ln.startswith("#")).replace(
        "CALL", "")  # CallSids start with CA
    # memory: well under the documented ~2-3 MB per call *in progress*, for calls that have ended
    assert after["rss_mb"] - warm["rss_mb"] <= 0.5 * n + 20, (warm, after)
    # every per-call key expires; only the documented indexes live on
    no_ttl = [k for k in r.scan_iter(count=1000) if r.ttl(k) == -1 and not LONG_LIVED.match(k)]
    assert not no_ttl, no_ttl[:10]
    # log volume per call stays small even with a junk flood in every 7th call
    assert (logs_after - logs_warm) / (n + 1) < 25, logs_after - logs_warm
    assert metric_value(text, "voicebot_errors_total", {"component": "twilio", "kind": "start_timeout"}) >= 2


async def test_second_stream_with_a_live_call_id_is_refused(bot: BotServer) -> None:
    """A replayed `start` with the CallSid of a live call must not take over its record and heartbeat:
    the first call to end would drop the other's live-index entry and the reaper would close a call
    that is still talking."""
    from bot.simulator import TwilioCaller

    r = redis.Redis.from_url(bot.redis_url, decode_responses=True)
    first = await place_call(bot.url)
    try:
        assert await first.wait_bot_quiet(quiet_s=0.4, timeout_s=20)
        # a replayed stream: nothing asks Twilio what next when it is refused
        dup = TwilioCaller(bot.url, AUTH_TOKEN, account_sid=ACCOUNT_SID, call_sid=first.call_sid, follow_action=False)
        await dup.connect()
        assert await dup.wait_ended(15), "the duplicate stream was not closed"
        await dup.close()
        await asyncio.sleep(1.0)
        assert not first.ended, "the live call was ended by its duplicate"
        assert r.zscore("calls:live", first.call_sid) is not None
        assert r.hget(f"call:{first.call_sid}", "status") == "active"
        assert r.hget(f"call:{first.call_sid}", "stream_sid") == first.stream_sid  # the record is still the first's
    finally:
        await first.hangup()
    text = bot.metrics()
    assert metric_value(text, "voicebot_errors_total", {"component": "twilio", "kind": "duplicate_call_id"}) >= 1
    assert metric_value(text, "voicebot_calls_total", {"outcome": "refused_duplicate"}) >= 1
