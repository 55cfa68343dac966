"""Close calls whose worker died: a call still `active` whose live-index heartbeat (calls:live,
refreshed every 5 s by the worker that owns it) is older than `stale_s` gets status `ended`,
outcome `worker_lost` and a `call_ended` event. Idempotent and safe with several reapers running
(HSETNX claims each call once); every key is touched on its own, so it works on Redis Cluster too.

The key schema is bot/state.py's (docs/state.md). Every worker runs it from its heartbeat loop
(bot/state.py: every 10 s, once its own writes have landed and not within 30 s of a Redis outage);
`bot chaos` checks that a killed worker's calls are closed by it."""

from __future__ import annotations

import json
import time
from typing import Any

from bot.state import LIVE, LIVE_INFO, call_key, events_key
from ops import metrics
from ops.logs import get_logger

log = get_logger("ops.reaper")
OUTCOME = "worker_lost"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


async def reap_orphans(r: Any, stale_s: float = 30.0, reaper: str = "reaper", ttl_s: int | None = None) -> list[str]:
    """Returns the call ids this call closed. `ttl_s` (BOT_CALL_TTL_S): the record and its event stream
    expire that long after the reap, as after a normal end (the stream has no TTL until its call ends)."""
    now = time.time()
    closed: list[str] = []
    for raw, last_seen in await r.zrangebyscore(LIVE, "-inf", now - stale_s, withscores=True):
        cid = _s(raw)
        key = call_key(cid)
        status = await r.hget(key, "status")
        if status is not None and _s(status) == "ended":
            await r.zrem(LIVE, cid)  # index entry left over from a crash between writes
            continue
        if not await r.hsetnx(key, "reaped_at", f"{now:.3f}"):
            continue  # another reaper got it
        info = await r.hget(LIVE_INFO, cid)
        meta = json.loads(_s(info)) if info else {}
        worker, transport = meta.get("worker", ""), meta.get("transport", "unknown")
        rec = {"status": "ended", "outcome": OUTCOME, "ended_at": f"{now:.3f}"}
        started = meta.get("started_at")
        if started is None:
            raw_started = await r.hget(key, "started_at")
            started = float(_s(raw_started)) if raw_started else None
        data: dict[str, Any] = {"outcome": OUTCOME, "worker": worker, "reaper": reaper}
        if started:
            # up to its last heartbeat: the call was alive then, and gone at most one heartbeat later
            data["duration_s"] = round(max(0.0, float(last_seen) - float(started)), 3)
            rec["duration_s"] = json.dumps(data["duration_s"])
        await r.hset(key, mapping=rec)
        await r.xadd(events_key(cid), {"type": "call_ended", "t": f"{now:.3f}", "data": json.dumps(data)})
        if ttl_s:
            await r.expire(key, ttl_s)
            await r.expire(events_key(cid), ttl_s)
        await r.zrem(LIVE, cid)
        await r.hdel(LIVE_INFO, cid)
        metrics.CALLS_TOTAL.labels(transport, OUTCOME).inc()
        log.warning("call_reaped", call_id=cid, worker=worker, outcome=OUTCOME)
        closed.append(cid)
    return closed
