"""Close calls whose worker died: a call still `active` whose live-index heartbeat (calls:live,
refreshed every 5 s by the worker that owns it) is older than `stale_s` gets status `ended`,
outcome `worker_lost` and a `call_ended` event. Idempotent and safe with several reapers running
(HSETNX claims each call once); every key is touched on its own, so it works on Redis Cluster too.

The key schema is bot/state.py's (docs/state.md). Used by `bot chaos` after killing a worker; the
same function can run periodically in every worker (docs/ops.md)."""

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


async def reap_orphans(r: Any, stale_s: float = 30.0, reaper: str = "reaper") -> list[str]:
    """Returns the call ids this call closed."""
    now = time.time()
    closed: list[str] = []
    for raw in await r.zrangebyscore(LIVE, "-inf", now - stale_s):
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
        await r.hset(key, mapping={"status": "ended", "outcome": OUTCOME, "ended_at": f"{now:.3f}"})
        await r.xadd(events_key(cid), {"type": "call_ended", "t": f"{now:.3f}",
                                       "data": json.dumps({"outcome": OUTCOME, "worker": worker, "reaper": reaper})})
        await r.zrem(LIVE, cid)
        await r.hdel(LIVE_INFO, cid)
        metrics.CALLS_TOTAL.labels(transport, OUTCOME).inc()
        log.warning("call_reaped", call_id=cid, worker=worker, outcome=OUTCOME)
        closed.append(cid)
    return closed
