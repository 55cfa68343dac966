"""Which softphone calls a new offer may carry on (bot/admin/softphone.py `_resume_leg`), against a real Redis: only
the same admin's softphone call, lost with its worker (or abandoned for lack of media) within the window, at most
three legs, and one new leg per lost one; a call still live on its worker is a 409 the console retries."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
import redis.asyncio as aioredis

from bot.admin import softphone
from bot.admin.auth import Principal
from bot.state import LIVE, call_key
from tests.helpers.server import isolated_redis_url

ALICE = Principal("alice", "editor")


async def _call(r: aioredis.Redis, cid: str, **rec: Any) -> None:
    base = {"transport": "webrtc", "caller": "softphone:alice", "status": "ended", "outcome": "worker_lost",
            "ended_at": f"{time.time():.3f}", "worker_pid": "4000000"}
    await r.hset(call_key(cid), mapping={**base, **{k: str(v) for k, v in rec.items()}})


async def _refused(app: Any, cid: str, who: Principal = ALICE) -> tuple[int, str]:
    with pytest.raises(softphone.SoftphoneError) as exc:
        await softphone._resume_leg(app, cid, who)
    return exc.value.status, exc.value.kind


async def test_which_lost_calls_a_new_offer_carries_on(redis_url: str) -> None:
    r = aioredis.from_url(isolated_redis_url(redis_url), decode_responses=True)
    await r.flushdb()
    app = SimpleNamespace(state=SimpleNamespace(redis=r))
    try:
        await _call(r, "webrtc-lost")
        assert await softphone._resume_leg(app, "webrtc-lost", ALICE) == 2
        assert await _refused(app, "webrtc-lost") == (409, "call_live")  # a second offer for the same lost leg
        await _call(r, "webrtc-net", outcome="abandoned", leg=2)  # the browser's network went away, second leg
        assert await softphone._resume_leg(app, "webrtc-net", ALICE) == 3
        await _call(r, "webrtc-3", leg=3)
        assert await _refused(app, "webrtc-3") == (409, "call_over")  # lost three times: not carried on again
        await _call(r, "webrtc-bye", outcome="completed")
        assert await _refused(app, "webrtc-bye") == (409, "call_over")  # the bot ended it
        await _call(r, "webrtc-ending", ending="goodbye")
        assert await _refused(app, "webrtc-ending") == (409, "call_over")  # it was saying goodbye
        await _call(r, "webrtc-old", ended_at=f"{time.time() - 120:.3f}")
        assert await _refused(app, "webrtc-old") == (409, "call_over")  # lost too long ago
        await _call(r, "webrtc-bob")
        assert await _refused(app, "webrtc-bob", Principal("bob", "editor")) == (403, "forbidden")
        await _call(r, "CA-twilio", transport="twilio")
        assert await _refused(app, "CA-twilio") == (403, "forbidden")
        assert await _refused(app, "webrtc-none") == (404, "unknown_call")
        now = time.time()
        await _call(r, "webrtc-live", status="active", outcome="", ended_at="")
        await r.zadd(LIVE, {"webrtc-live": now})
        assert await _refused(app, "webrtc-live") == (409, "call_live")  # its worker still beats
        # its worker died and nobody has closed it yet: closed worker_lost here, then carried on
        await _call(r, "webrtc-dead", status="active", outcome="", ended_at="")
        await r.zadd(LIVE, {"webrtc-dead": now - 60})
        assert await softphone._resume_leg(app, "webrtc-dead", ALICE) == 2
        rec = await r.hgetall(call_key("webrtc-dead"))
        assert rec["status"] == "ended" and rec["outcome"] == "worker_lost", rec
    finally:
        await r.flushdb()
        await r.aclose()
