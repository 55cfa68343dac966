"""Close calls whose worker died: a call still `active` whose live-index heartbeat (calls:live,
refreshed every 5 s by the worker that owns it) is older than `stale_s` gets status `ended`,
outcome `worker_lost` and a `call_ended` event. Idempotent and safe with several reapers running
(a claim with a lease makes each call closed once, and a reaper that dies mid-close is taken over);
every key is touched on its own, so it works on Redis Cluster too.

Times are Redis's clock (TIME), as are the heartbeats (bot/state.py): workers whose clocks disagree
never reap each other's live calls.

The key schema is bot/state.py's (docs/state.md). Every worker runs it from its heartbeat loop
(bot/state.py: every 10 s, once its own writes have landed and not within 30 s of a Redis outage);
the `bot serve --workers N` supervisor runs `reap_worker` the moment one of its workers dies (its calls
close within a second instead of 30-45 s); `bot chaos` checks that a killed worker's calls are closed."""

from __future__ import annotations

import json
from typing import Any

from redis.exceptions import ResponseError

from bot.state import LIVE, LIVE_INFO, as_str, call_key, events_key, finite_float
from ops import metrics
from ops.logs import get_logger

log = get_logger("ops.reaper")
OUTCOME = "worker_lost"
# A claim older than this whose call is still `active` belongs to a reaper that died mid-close: it is
# taken over. Far longer than a close takes (a few round trips on a 2 s socket timeout)
CLAIM_LEASE_S = 40.0

# one key: fine on Cluster. Claims the call unless it is ended, claimed by a reaper within the lease, or now
# held by another process than the dead one (ARGV[4], its pid; '' = unknown): a Twilio call whose stream was
# lost with its worker comes back on a new stream, under the same call id, on a live worker
_CLAIM = """
if redis.call('HGET', KEYS[1], 'status') == 'ended' then return 0 end
local owner = redis.call('HGET', KEYS[1], 'worker_pid')
if ARGV[4] ~= '' and owner and owner ~= ARGV[4] then return 0 end
local t = tonumber(redis.call('HGET', KEYS[1], 'reaped_at'))
if t and tonumber(ARGV[1]) - t < tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'reaped_at', ARGV[1], 'reaped_by', ARGV[3])
return 1
"""


async def redis_time(r: Any) -> float:
    """Redis's clock (unix s): the one clock every worker's heartbeats and every reaper agree on."""
    res = await r.time()
    if isinstance(res, dict):  # a RedisCluster may answer per node: any one will do
        res = next(iter(res.values()))
    sec, usec = res
    return int(sec) + int(usec) / 1e6


async def _close(r: Any, cid: str, now: float, last_seen: float | None, reaper: str, ttl_s: int | None) -> bool:
    """Close one orphaned call exactly once; False when it was ended or another reaper holds it."""
    key = call_key(cid)
    # the owner as the live index names it, read before the claim: a call taken over by a new leg since (its
    # record names the new process) is not closed, whichever of its writes has landed
    info = await r.hget(LIVE_INFO, cid)
    try:
        meta = json.loads(as_str(info)) if info else {}
    except ValueError:
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    owner = str(meta.get("pid", "")) if meta.get("pid") is not None else ""
    if not int(await r.eval(_CLAIM, 1, key, f"{now:.3f}", str(CLAIM_LEASE_S), reaper, owner)):
        if as_str(await r.hget(key, "status") or "") == "ended":
            await r.zrem(LIVE, cid)  # index entry left over from a crash between writes
            await r.hdel(LIVE_INFO, cid)
        return False
    worker, transport = meta.get("worker", ""), meta.get("transport", "unknown")
    rec = {"status": "ended", "outcome": OUTCOME, "ended_at": f"{now:.3f}"}
    started = finite_float(meta.get("started_at"))
    if started is None:  # garbled values are unknown, never a failed reap
        started = finite_float(await r.hget(key, "started_at"))
    data: dict[str, Any] = {"outcome": OUTCOME, "worker": worker, "reaper": reaper}
    if meta.get("pid") is not None:
        data["worker_pid"] = meta["pid"]
    if started and last_seen is not None:
        # up to its last heartbeat: the call was alive then, and gone at most one heartbeat later
        data["duration_s"] = round(max(0.0, float(last_seen) - started), 3)
        rec["duration_s"] = json.dumps(data["duration_s"])
    # a reaper that died after this XADD and before the HSET below is taken over after the lease: its
    # call_ended is already there and must not be written twice
    last = await r.xrevrange(events_key(cid), count=1)
    if not (last and as_str(_fields(last[0][1]).get("type", "")) == "call_ended"):
        await r.xadd(events_key(cid), {"type": "call_ended", "t": f"{now:.3f}", "data": json.dumps(data)})
    await r.hset(key, mapping=rec)
    if ttl_s:
        await r.expire(key, ttl_s)
        await r.expire(events_key(cid), ttl_s)
    await r.zrem(LIVE, cid)
    await r.hdel(LIVE_INFO, cid)
    metrics.CALLS_TOTAL.labels(transport, OUTCOME).inc()
    log.warning("call_reaped", call_id=cid, worker=worker, worker_pid=meta.get("pid"), reaper=reaper,
                outcome=OUTCOME)
    return True


def _fields(f: Any) -> dict[str, Any]:
    return {as_str(k): v for k, v in f.items()} if isinstance(f, dict) else {}


async def reap_orphans(r: Any, stale_s: float = 30.0, reaper: str = "reaper", ttl_s: int | None = None) -> list[str]:
    """Returns the call ids this call closed. `ttl_s` (BOT_CALL_TTL_S): the record and its event stream
    expire that long after the reap, as after a normal end (the stream has no TTL until its call ends)."""
    now = await redis_time(r)
    closed: list[str] = []
    for raw, last_seen in await r.zrangebyscore(LIVE, "-inf", now - stale_s, withscores=True):
        cid = as_str(raw)
        fresh = await r.zscore(LIVE, cid)
        if fresh is not None and float(fresh) > now - stale_s:
            continue  # heartbeat since the scan: a new leg of the call (a reconnected Twilio stream) holds it
        if await _close_one(r, cid, now, float(last_seen), reaper, ttl_s):
            closed.append(cid)
    return closed


async def _close_one(r: Any, cid: str, now: float, last_seen: float | None, reaper: str, ttl_s: int | None) -> bool:
    """One call's refusal (a key of the wrong type, written by hand or by another app) must not stop the reaper
    for every other orphan on every pass; connection errors still abort the pass (the next one retries)."""
    try:
        return await _close(r, cid, now, last_seen, reaper, ttl_s)
    except ResponseError as exc:
        metrics.ERRORS.labels("state", "reap_failed").inc()
        log.warning("call_reap_failed", call_id=cid, error=str(exc)[:200])
        return False


async def close_lost_leg(r: Any, cid: str, reaper: str, ttl_s: int | None = None) -> bool:
    """Close a call whose Twilio stream Twilio reported gone while its worker never ended it (dead, or too stuck
    to notice): answering Twilio with a new stream for the same call, the lost leg gets its own end first,
    `worker_lost` as a reaper would write it, instead of waiting for one (or for none: a reaper looking after
    the new leg has started refuses it). The TTL is set as for any ended call (the caller may hang up before
    the new stream starts); a new leg sets it again."""
    now = await redis_time(r)
    last_seen = await r.zscore(LIVE, cid)
    return await _close_one(r, cid, now, float(last_seen) if last_seen is not None else None, reaper, ttl_s)


async def reap_worker(r: Any, worker: str, pid: int, reaper: str = "supervisor",
                      ttl_s: int | None = None) -> list[str]:
    """Close at once the calls of one worker process known to be dead (its supervisor saw it exit): those
    whose live-index entry names this worker id and pid. The pid matters: a restarted worker keeps its
    slot's id, and its replacement's calls are live."""
    now = await redis_time(r)
    closed: list[str] = []
    for raw_cid, raw in (await r.hgetall(LIVE_INFO)).items():
        try:
            meta = json.loads(as_str(raw))
        except ValueError:
            continue
        if not isinstance(meta, dict) or meta.get("worker") != worker or meta.get("pid") != pid:
            continue
        cid = as_str(raw_cid)
        last_seen = await r.zscore(LIVE, cid)
        if await _close_one(r, cid, now, float(last_seen) if last_seen is not None else None, reaper, ttl_s):
            closed.append(cid)
    return closed


def main(argv: list[str] | None = None) -> int:
    """`python -m bot.reaper --worker ID --pid PID`: the supervisor's one-shot reap of a worker it saw die.
    A process of its own, so the reaped calls are counted in the workers' shared (multiprocess) metrics."""
    import argparse
    import asyncio
    import os

    from ops.logs import configure_logging

    ap = argparse.ArgumentParser(prog="python -m bot.reaper")
    ap.add_argument("--worker", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--reaper", default="supervisor")
    ap.add_argument("--ttl-s", type=int, default=None)
    ap.add_argument("--timeout-s", type=float, default=20.0)
    args = ap.parse_args(argv)
    configure_logging()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        # this short-lived process must not show up in the workers' live gauges (its voicebot_redis_up
        # reads 0 from import on); its counters stay and are summed with the workers'
        multiprocess.mark_process_dead(os.getpid())
    url = os.environ.get("REDIS_URL", "")
    if not url:
        log.warning("dead_worker_reap_skipped", worker=args.worker, worker_pid=args.pid, reason="no REDIS_URL")
        return 2

    async def run() -> list[str]:
        from bot.state import connect

        r = connect(url)
        try:
            return await asyncio.wait_for(reap_worker(r, args.worker, args.pid, reaper=args.reaper, ttl_s=args.ttl_s),
                                          args.timeout_s)
        finally:
            await r.aclose()

    try:
        closed = asyncio.run(run())
    except Exception as exc:  # noqa: BLE001 - Redis down or slow: the workers' heartbeat reaper closes them later
        metrics.ERRORS.labels("state", "reap_failed").inc()
        log.warning("dead_worker_reap_failed", worker=args.worker, worker_pid=args.pid, error=repr(exc))
        return 1
    log.warning("dead_worker_calls_closed", worker=args.worker, worker_pid=args.pid, calls=len(closed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
