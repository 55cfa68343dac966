"""A worker's call-state bookkeeping over many calls (bot/state.py against a real redis-server): every
in-process structure keyed by call goes back to empty (or stays bounded) once the calls have ended,
including when an event arrives after `call_ended` (a protocol error that raced the hang-up), and every
per-call key expires."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

import bot.state
from bot.state import LIVE, LIVE_INFO, CallStore, call_key, events_key
from ops import metrics
from tests.helpers.server import isolated_redis_url


async def test_per_call_bookkeeping_is_released(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bot.state, "ENDED_IDS_MAX", 50)
    url = isolated_redis_url(redis_url)
    r = aioredis.from_url(url, decode_responses=True)
    await r.flushdb()
    s = CallStore(aioredis.from_url(url, decode_responses=True), worker="w-soak", ttl_s=600)
    await s.start()
    refused0 = metrics.ERRORS.labels("state", "duplicate_suppressed")._value.get()
    failed0 = metrics.ERRORS.labels("state", "command_failed")._value.get()
    try:
        n = 200
        for i in range(n):
            cid = f"CAsoak{i:04d}"
            s.start_call(cid, "twilio", "+15550001111", "+15550002222", "1")
            s.subscribe(cid, lambda _ok: None)
            s.event(cid, "turn", n=1)
            s.end_call(cid, "caller_hangup", turns=1)
            # late, twice: each must land after call_ended with its own increasing id
            s.event(cid, "error", component="twilio", kind="unknown_event", detail="late")
            s.event(cid, "error", component="twilio", kind="unknown_event", detail="late")
        assert await s.flush(timeout_s=30)
        assert not s._active and not s._listeners and not s._last_id and not s._base
        assert len(s._ended_ids) <= 50  # bounded, whatever the number of calls
        assert await r.zcard(LIVE) == 0 and await r.hlen(LIVE_INFO) == 0
        got = await s.get_call("CAsoak0199")
        assert got is not None
        assert [e["type"] for e in got["events"]] == ["call_started", "turn", "call_ended", "error", "error"]
        ids = [e["id"] for e in got["events"]]
        assert len(set(ids)) == len(ids)
        for cid in ("CAsoak0000", "CAsoak0199"):
            assert 0 < await r.ttl(call_key(cid)) <= 600 and 0 < await r.ttl(events_key(cid)) <= 600
        # nothing was refused as a repeat or failed: the late events got fresh ids
        assert metrics.ERRORS.labels("state", "duplicate_suppressed")._value.get() == refused0
        assert metrics.ERRORS.labels("state", "command_failed")._value.get() == failed0
    finally:
        await s.close()
        await r.aclose()
