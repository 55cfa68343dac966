"""Call state in Redis: one record (hash) and one append-only event stream per call, plus a
live-calls index shared by all workers. Key schema: docs/state.md.

Writes never sit on the voice path: they go into an in-process queue that one writer task
pipelines to Redis. When Redis is unreachable the queue buffers (bounded), `voicebot_redis_up`
drops to 0, errors are counted, listeners (the live conversations) are told, and everything is
flushed in order once Redis answers again.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import OrderedDict, deque
from typing import Any, Callable

import redis.asyncio as aioredis
from redis.exceptions import (BusyLoadingError, ClusterDownError, MasterDownError, OutOfMemoryError, ReadOnlyError,
                              RedisError, TryAgainError)

from ops import metrics
from ops.logs import get_logger, mask_digits

log = get_logger("bot.state")

LIVE = "calls:live"  # zset call_id -> last heartbeat (unix s, Redis's clock)
LIVE_INFO = "calls:live:info"  # hash call_id -> json {worker, pid, transport, started_at, caller_masked}
RECENT = "calls:recent"  # zset call_id -> start time (unix s), trimmed
WORKERS = "workers"  # zset worker id -> last heartbeat (Redis's clock)
RECENT_MAX = 10000
HEARTBEAT_S = 5.0
LIVE_STALE_S = 30.0
REAP_EVERY_S = 10.0  # how often each worker looks for calls orphaned by a dead worker
ENDED_IDS_MAX = 1024  # ended calls whose last event id is kept, for events that arrive after call_ended
# ends that lost the caller's line with the caller still on it (their worker died, the socket vanished, the
# conversation crashed): a Twilio call ended so is given a new stream (telephony/twilio/server.py)
STREAM_LOST_OUTCOMES = frozenset({"worker_lost", "disconnected", "error:exception"})
RESUMABLE_MAX_AGE_S = 86400.0  # a listed call older than this is dropped from the list (a call lasts hours at most)
ENDS_REPLAY_S = 120.0  # calls ended this recently have their end written again when the Redis server changes
# after an outage, this worker's live calls are checked this long for a reap by other workers (bot/reaper.py):
# while it was cut off from Redis they could not tell it from a dead one
RECLAIM_CHECK_S = LIVE_STALE_S + 2 * HEARTBEAT_S

# one key (the call's record): a call reaped as `worker_lost` while the process named in it (ARGV[2]) was only
# cut off from Redis is live again; anything else (its real end landed, another process holds it) is left alone
_RECLAIM = """
if redis.call('HGET', KEYS[1], 'status') ~= 'ended' then return false end
if redis.call('HGET', KEYS[1], 'outcome') ~= ARGV[1] then return false end
if redis.call('HGET', KEYS[1], 'worker_pid') ~= ARGV[2] then return false end
local by = redis.call('HGET', KEYS[1], 'reaped_by') or ''
redis.call('HSET', KEYS[1], 'status', 'active', 'outcome', '', 'ended_at', '', 'duration_s', '', 'reaped_at', '',
           'reaped_by', '')
redis.call('PERSIST', KEYS[1])
return by
"""

# Refusals that say "Redis cannot take writes right now", not "this command is wrong": maxmemory reached
# (OOM), AOF/RDB write failing (MISCONF: disk full), a demoted master (READONLY), loading the AOF after a
# restart (LOADING), ... The batch stays queued and is retried like a connection error, instead of being
# dropped one command at a time while voicebot_redis_up still says 1.
_RETRYABLE = (OutOfMemoryError, ReadOnlyError, BusyLoadingError, MasterDownError, TryAgainError, ClusterDownError)
_RETRYABLE_PREFIXES = ("OOM", "MISCONF", "READONLY", "LOADING", "MASTERDOWN", "NOREPLICAS", "BUSY ", "TRYAGAIN",
                       "CLUSTERDOWN")


def _retryable(res: Any) -> bool:
    return isinstance(res, _RETRYABLE) or (isinstance(res, RedisError) and str(res).startswith(_RETRYABLE_PREFIXES))


def call_key(call_id: str) -> str:
    return f"call:{call_id}"


def resumable_key(worker: str) -> str:
    """zset call_id -> when its dialog was kept: this worker's calls another process of the same id can carry on
    (SIP calls: bot/sip_recovery.py)."""
    return f"calls:resumable:{worker}"


def events_key(call_id: str) -> str:
    return f"call:{call_id}:events"


def connect(url: str) -> aioredis.Redis:
    """REDIS_URL -> client. Uses the ops engineer's bot.redis_client (sentinel/cluster) when present."""
    try:
        from bot.redis_client import connect as ops_connect  # type: ignore[import-not-found]
    except ImportError:
        ops_connect = None
    if ops_connect is not None:
        return ops_connect(url)
    return aioredis.from_url(url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=2.0)


def as_str(v: Any) -> str:
    """A value read from Redis as text, whether or not the client was built with decode_responses."""
    return v.decode() if isinstance(v, bytes) else str(v)


def decode_hash(d: dict[Any, Any]) -> dict[str, str]:
    """A hash read from Redis (HGETALL, a stream entry's fields) as text, whichever way the client decodes."""
    return {as_str(k): as_str(v) for k, v in d.items()}


Op = tuple[str, tuple[Any, ...], dict[str, Any]]


def finite_float(v: Any) -> float | None:
    """A number read back from Redis (an event time, a duration); None for a missing, garbled or NaN one (shown as
    unknown, never a failed read)."""
    try:
        t = float(v)
    except (TypeError, ValueError):
        return None
    return t if t == t else None


def _promoted_from(replid2: object) -> str:
    """master_replid2: the replication id a server had before it was promoted from a replica, all zeros when it
    never was (redis-py parses those zeros as the int 0). "" for never promoted."""
    text = str(replid2)
    return "" if text.strip("0") == "" else text


def cluster_primaries_changed(known: dict[str, tuple[str, str]], now: dict[str, tuple[str, str]]) -> bool:
    """Whether a cluster's writes now go to a server that may lack some of ours: a primary restarted at an address
    seen before (new run_id) or a replica promoted over its primary (a promotion keeps the old replication id as
    master_replid2). The set of primaries also changes when slots move: a node drained of every slot drops out of
    the map and one given its first slots joins it, its data migrated key by key. That is no loss, and counting it
    would page on-call (RedisServerChanged) at every reshard. A node missing from one map and back in the next is
    no change either. `known` and `now`: {address: (run_id, what it was promoted from)}; `known` holds every
    primary seen."""
    for addr, (run_id, promoted_from) in now.items():
        seen = known.get(addr)
        if seen == (run_id, promoted_from):
            continue
        if seen is not None and seen[0] != run_id:
            return True
        if promoted_from and (seen is None or seen[1] != promoted_from):
            return True
    return False


class CallStore:
    def __init__(self, client: aioredis.Redis, worker: str, ttl_s: int, max_buffer: int = 100_000) -> None:
        self.r = client
        self.worker = worker
        self.ttl_s = ttl_s
        self._q: deque[Op] = deque()
        self._max = max_buffer
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._hb_task: asyncio.Task[None] | None = None
        self._active: set[str] = set()
        self._resumable: set[str] = set()  # calls listed under resumable_key(worker) (keep_resumable)
        # live call id -> (its start record, its live-index entry): rewritten when Redis comes back without them
        self._base: dict[str, tuple[dict[str, str], str]] = {}
        self._server_id: str | None = None  # Redis run_id(s) last seen: a change = restart or failover
        # a cluster's primaries ever seen, {address: (run_id, promoted from)} (cluster_primaries_changed)
        self._cluster_known: dict[str, tuple[str, str]] = {}
        self.healthy = True
        self._listeners: dict[str, Callable[[bool], None]] = {}
        self._closing = False
        self._last_reap = 0.0
        self._healthy_since = 0.0  # time of the last recovery from an outage (0: never down)
        self._reclaim_until = 0.0  # after an outage: until when live calls are checked for a reap (time.time())
        self._last_id: dict[str, tuple[int, int]] = {}  # live call id -> last event stream id (ms, seq)
        # the same for recently ended calls, bounded: a late event (a protocol error that raced the hang-up)
        # must neither reuse an id nor leave an entry behind for every call the worker ever had
        self._ended_ids: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._dropped = 0  # ops dropped from the head of the queue on overflow
        # the writes that ended recent calls (call id -> (time, ops)): a failover to a replica that had not
        # caught up loses the last seconds of writes, and a call that ended in them would stay "active" until
        # the reaper closed it as worker_lost (and counted it twice); replayed when the server changes
        self._recent_ends: OrderedDict[str, tuple[float, list[Op]]] = OrderedDict()
        # how this worker's recent calls ended, as this worker knows it without Redis: ("ending", reason) once the
        # bot decided to hang up, ("ended", outcome) once over. Twilio asks what next the moment a stream closes,
        # possibly during a Redis outage; when it asks this worker, the answer needs no Redis
        self._local_ends: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._capture: list[Op] | None = None
        # this process: a worker restarted by its supervisor keeps its slot's id, so the pid tells the dead
        # incarnation's calls from the live one's (bot/reaper.py reap_worker)
        self.pid = os.getpid()
        # Redis's clock minus ours: heartbeats are scored in Redis's time, so a worker whose clock is off by
        # more than the stale limit neither has its live calls reaped nor reaps other workers' live calls
        self._clock_offset = 0.0

    # ---- lifecycle ----
    async def start(self) -> None:
        await self._sync_clock()
        await self._check_server()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._writer())
        self._hb_task = loop.create_task(self._heartbeat())

    async def close(self, timeout_s: float = 5.0) -> None:
        """Flush what is buffered (bounded wait), then stop."""
        self._closing = True
        await self._flush_wait(timeout_s)
        for t in (self._hb_task, self._task):
            if t is not None:
                t.cancel()
        try:
            await self.r.zrem(WORKERS, self.worker)
        except (RedisError, OSError):
            pass
        if self._q:
            log.warning("state_unflushed", ops=len(self._q))
            metrics.ERRORS.labels("state", "unflushed_on_shutdown").inc(len(self._q))
        try:
            await self.r.aclose()
        except Exception:  # noqa: BLE001
            pass

    def redis_now(self) -> float:
        """Now on Redis's clock (as last measured): the time base of calls:live and workers."""
        return time.time() + self._clock_offset

    async def _sync_clock(self, timeout_s: float = 1.0) -> None:
        from bot.reaper import redis_time  # bot.reaper imports this module's key schema

        try:
            t0 = time.time()
            remote = await asyncio.wait_for(redis_time(self.r), timeout_s)
            t1 = time.time()
        except (RedisError, OSError, asyncio.TimeoutError, ValueError, TypeError) as exc:
            log.debug("clock_sync_failed", error=repr(exc))  # Redis down: the writer reports that; keep the last offset
            return
        offset = remote - (t0 + t1) / 2
        if abs(offset) > LIVE_STALE_S / 3 and abs(offset - self._clock_offset) > 1.0:
            log.warning("clock_skew", worker=self.worker, offset_s=round(offset, 3),
                        hint="this host's clock disagrees with Redis's: check NTP; heartbeats use Redis's clock")
        self._clock_offset = offset

    async def _check_server(self, timeout_s: float = 1.0) -> None:
        """A Redis restarted without persistence (or a failover to a replica that had not caught up) has lost
        the start records and live-index entries of calls in progress: their records would end up without
        caller, start time or worker, `bot calls live` would not say which worker holds them, and the reaper
        would not know whose they were. On a new run_id, rewrite what this worker's live calls started with
        (unchanged values: harmless when nothing was lost) and note it in each call's events."""
        try:
            if hasattr(self.r, "get_nodes"):
                primaries = await self._cluster_primaries(timeout_s)
                if primaries is None:
                    return
                changed = bool(self._cluster_known) and cluster_primaries_changed(self._cluster_known, primaries)
                self._cluster_known.update(primaries)
                sid = ",".join(sorted(run for run, _promoted in primaries.values()))
            else:
                info = await asyncio.wait_for(self.r.info("server"), timeout_s)
                sid = str(info["run_id"]) if isinstance(info, dict) and "run_id" in info else None
                changed = sid is not None and self._server_id is not None and sid != self._server_id
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            log.debug("server_check_failed", error=repr(exc))
            return
        if sid is None:
            return
        previous, self._server_id = self._server_id, sid
        if not changed or previous is None:
            return
        # counted, not just logged: after a forced/manual failover this is the only signal (the old master took
        # writes until demoted, then dropped them; voicebot_redis_up never left 1). Alert RedisServerChanged
        metrics.REDIS_SERVER_CHANGES.inc()
        log.warning("redis_server_changed", worker=self.worker, previous=previous[:12], now=sid[:12],
                    live_calls=len(self._base),
                    hint="Redis restarted or failed over: live calls' start records rewritten; events written "
                         "just before may be lost (runbook RedisFailingOver)")
        now, rnow = time.time(), self.redis_now()
        for cid, (rec, live_info) in list(self._base.items()):
            self._push("hset", call_key(cid), mapping=rec)
            self._push("expire", call_key(cid), self.ttl_s)
            self._push("zadd", LIVE, {cid: rnow})
            self._push("hset", LIVE_INFO, cid, live_info)
            self._push("zadd", RECENT, {cid: now}, nx=True)
            self.event(cid, "state_restored", reason="redis_server_changed")
        # calls that ended just before: their end may be among the lost writes (same stream ids: a repeat of an
        # end Redis kept is refused as a duplicate, a lost one is written again)
        cutoff = time.monotonic() - ENDS_REPLAY_S
        replayed = 0
        for _cid, (t_end, ops) in list(self._recent_ends.items()):
            if t_end >= cutoff:
                replayed += 1
                for op, args, kw in ops:
                    self._push(op, *args, **kw)
        if replayed:
            log.info("recent_call_ends_rewritten", calls=replayed)

    async def _cluster_primaries(self, timeout_s: float) -> dict[str, tuple[str, str]] | None:
        """The cluster's primaries as {address: (run_id, what it was promoted from)} (cluster_primaries_changed). The client's map of the cluster only
        changes when one of our writes is redirected, so after a failover in a shard that none of the last writes
        touched it would still list the demoted primary. A listed primary that answers as a replica, or one that
        cannot be reached, means the map is stale: refresh it from the cluster and ask again."""
        for attempt in range(2):
            try:
                info = await asyncio.wait_for(
                    self.r.execute_command("INFO", "server", "replication", target_nodes=self.r.PRIMARIES), timeout_s)
                stale = not isinstance(info, dict) or any(
                    not isinstance(v, dict) or v.get("role") != "master" for v in info.values())
            except (RedisError, OSError, asyncio.TimeoutError):
                if attempt:
                    raise
                stale, info = True, None
            if not stale and isinstance(info, dict):
                return {str(addr): (str(v.get("run_id", "")), _promoted_from(v.get("master_replid2", "")))
                        for addr, v in info.items()}
            if attempt == 0:
                await asyncio.wait_for(self.r.nodes_manager.initialize(), timeout_s * 2)
        return None  # still mid-failover: the next heartbeat looks again

    async def _flush_wait(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    async def flush(self, timeout_s: float = 5.0) -> bool:
        await self._flush_wait(timeout_s)
        return not self._q

    def subscribe(self, call_id: str, fn: Callable[[bool], None]) -> None:
        """fn(healthy) on every Redis up/down transition while the call lives; a call that starts while
        Redis is already down is told at once (fn(False) on the next loop turn), like the calls that
        were live when it went down."""
        self._listeners[call_id] = fn
        if not self.healthy:
            def tell() -> None:
                if self._listeners.get(call_id) is fn and not self.healthy:
                    try:
                        fn(False)
                    except Exception:  # noqa: BLE001
                        log.exception("state_listener_failed")
            asyncio.get_running_loop().call_soon(tell)

    # ---- writes (never block the caller) ----
    def _push(self, op: str, *args: Any, **kw: Any) -> None:
        if len(self._q) >= self._max:
            self._q.popleft()
            self._dropped += 1
            metrics.ERRORS.labels("state", "buffer_overflow").inc()
        self._q.append((op, args, kw))
        if self._capture is not None:
            self._capture.append((op, args, kw))
        self._idle.clear()
        self._wake.set()

    def start_call(self, call_id: str, transport: str, caller: str, called: str, policy_version: str,
                   extra: dict[str, Any] | None = None, leg: int = 1) -> None:
        """`leg` 2+: the call came back on a new stream after its previous one was lost (its worker died, the
        socket broke): the same record becomes active again on this worker, keeps its start time and story, and
        its stream gets `call_resumed` instead of `call_started`."""
        now = time.time()
        rnow = self.redis_now()
        rec = {
            "call_id": call_id, "transport": transport, "caller": caller, "caller_masked": mask_digits(caller),
            "called": called, "started_at": f"{now:.3f}", "status": "active", "outcome": "",
            "policy_version": policy_version, "worker": self.worker, "worker_pid": str(self.pid),
        }
        if leg > 1:
            rec.update({"leg": str(leg), "resumed_at": f"{now:.3f}", "ended_at": "", "reaped_at": "", "ending": ""})
        for k, v in (extra or {}).items():
            rec[k] = v if isinstance(v, str) else json.dumps(v)
        info = json.dumps({"worker": self.worker, "pid": self.pid, "transport": transport, "started_at": rnow,
                           "caller_masked": mask_digits(caller)})
        self._active.add(call_id)
        self._local_ends.pop(call_id, None)  # live (again) on this worker
        if call_id in self._ended_ids:
            # a leg back on this worker: its events go on after the lost leg's in the same stream, and an id
            # at or below the last one (the same millisecond) would be refused as a duplicate
            self._last_id[call_id] = self._ended_ids[call_id]
        if leg > 1:
            # the first leg's start time stays (the call's duration is the caller's); a record that never
            # started (a stream refused while draining) gets this one
            started = rec.pop("started_at")
            self._push("hsetnx", call_key(call_id), "started_at", started)
        self._base[call_id] = (rec, info)
        self._push("hset", call_key(call_id), mapping=rec)
        self._push("expire", call_key(call_id), self.ttl_s)
        self._push("zadd", LIVE, {call_id: rnow})
        self._push("hset", LIVE_INFO, call_id, info)
        self._push("zadd", RECENT, {call_id: now})
        self._push("zremrangebyrank", RECENT, 0, -RECENT_MAX - 1)
        if leg > 1:
            self.event(call_id, "call_resumed", leg=leg, transport=transport, worker=self.worker,
                       worker_pid=self.pid, policy_version=policy_version)
        else:
            self.event(call_id, "call_started", transport=transport, worker=self.worker, worker_pid=self.pid,
                       policy_version=policy_version)

    def update(self, call_id: str, **fields: Any) -> None:
        self._push("hset", call_key(call_id), mapping={k: v if isinstance(v, str) else json.dumps(v)
                                                        for k, v in fields.items()})

    def event(self, call_id: str, etype: str, **data: Any) -> None:
        now = time.time()
        fields = {"type": etype, "t": f"{now:.3f}", "data": json.dumps(data, default=str)}
        # An explicit, per-call increasing stream id makes the write idempotent: if a pipeline is
        # retried after Redis applied it (a stall that outlived our timeout), the repeat is refused
        # by Redis ("ID equal or smaller") instead of duplicating the event.
        live = call_id in self._active
        ms, seq = (self._last_id if live else self._ended_ids).get(call_id, (0, -1))
        now_ms = int(now * 1000)
        ms, seq = (now_ms, 0) if now_ms > ms else (ms, seq + 1)
        if live:
            self._last_id[call_id] = (ms, seq)
        else:
            self._remember_ended(call_id, (ms, seq))
        self._push("xadd", events_key(call_id), fields, id=f"{ms}-{seq}")

    def late_event(self, call_id: str, etype: str, **data: Any) -> None:
        """An event that may come after the call ended, on any worker (Twilio's report of how a transfer's
        <Dial>/<Enqueue> went): recorded, and the stream keeps a TTL even if it had already expired."""
        self.event(call_id, etype, **data)
        self._push("expire", events_key(call_id), self.ttl_s)

    def keep_resumable(self, call_id: str, state: dict[str, Any]) -> None:
        """What a restarted process of this worker needs to carry the call on (a SIP dialog: field `sip_dialog`),
        listed under this worker until the call ends."""
        now = time.time()
        self._resumable.add(call_id)
        self._push("hset", call_key(call_id), "sip_dialog", json.dumps(state, separators=(",", ":")))
        self._push("zadd", resumable_key(self.worker), {call_id: now})
        self._push("zremrangebyscore", resumable_key(self.worker), "-inf", now - RESUMABLE_MAX_AGE_S)

    def mark_ending(self, call_id: str, reason: str) -> None:
        """The bot is about to hang up this call: recorded (field `ending`) and remembered here."""
        self._remember_local(call_id, ("ending", reason))
        self.update(call_id, ending=reason)

    def local_end(self, call_id: str) -> tuple[str, str] | None:
        """("ending", reason) or ("ended", outcome) for a recent call of this worker; None if it has none."""
        return self._local_ends.get(call_id)

    def _remember_local(self, call_id: str, what: tuple[str, str]) -> None:
        self._local_ends[call_id] = what
        self._local_ends.move_to_end(call_id)
        while len(self._local_ends) > ENDED_IDS_MAX:
            self._local_ends.popitem(last=False)

    def end_call(self, call_id: str, outcome: str, **fields: Any) -> None:
        self._remember_local(call_id, ("ended", outcome))
        self._capture = []
        try:
            self._end_call(call_id, outcome, **fields)
            self._recent_ends[call_id] = (time.monotonic(), self._capture)
            self._recent_ends.move_to_end(call_id)
            while len(self._recent_ends) > ENDED_IDS_MAX:
                self._recent_ends.popitem(last=False)
        finally:
            self._capture = None

    def _end_call(self, call_id: str, outcome: str, **fields: Any) -> None:
        now = time.time()
        self.event(call_id, "call_ended", outcome=outcome, **fields)
        rec = {"status": "ended", "outcome": outcome, "ended_at": f"{now:.3f}"}
        rec.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})
        self._push("hset", call_key(call_id), mapping=rec)
        self._push("expire", call_key(call_id), self.ttl_s)
        self._push("expire", events_key(call_id), self.ttl_s)
        self._push("zrem", LIVE, call_id)
        self._push("hdel", LIVE_INFO, call_id)
        if call_id in self._resumable:  # over: nothing left for another process to carry on
            self._resumable.discard(call_id)
            self._push("zrem", resumable_key(self.worker), call_id)
            self._push("hdel", call_key(call_id), "sip_dialog")
        self._active.discard(call_id)
        self._base.pop(call_id, None)
        self._listeners.pop(call_id, None)
        last = self._last_id.pop(call_id, None)
        if last is not None:
            self._remember_ended(call_id, last)

    def _remember_ended(self, call_id: str, last: tuple[int, int]) -> None:
        self._ended_ids[call_id] = last
        self._ended_ids.move_to_end(call_id)
        while len(self._ended_ids) > ENDED_IDS_MAX:
            self._ended_ids.popitem(last=False)

    # ---- reads ----
    async def get_call(self, call_id: str) -> dict[str, Any] | None:
        rec = decode_hash(await self.r.hgetall(call_key(call_id)))
        raw = await self.r.xrange(events_key(call_id))
        if not rec and not raw:
            return None
        events = []
        for eid, f in raw:
            eid, f = as_str(eid), decode_hash(f)
            # a garbled entry (written by hand, by an old release) is shown as it is, never a 500 for the whole call
            try:
                data = json.loads(f.get("data", "{}"))
            except ValueError:
                data = {"raw": f.get("data")}
            if not isinstance(data, dict):
                data = {"raw": data}
            events.append({**data, "id": eid, "type": f.get("type"), "t": finite_float(f.get("t"))})
        return {"record": rec, "events": events}

    async def live_calls(self) -> list[dict[str, Any]]:
        cutoff = self.redis_now() - LIVE_STALE_S
        ids = [as_str(i) for i in await self.r.zrangebyscore(LIVE, cutoff, "+inf")]
        if not ids:
            return []
        infos = [as_str(i) if i is not None else None for i in await self.r.hmget(LIVE_INFO, ids)]
        return [{"call_id": cid, **(json.loads(i) if i else {})} for cid, i in zip(ids, infos)]

    def settled(self, now: float | None = None) -> bool:
        """Redis has taken our writes for at least LIVE_STALE_S: other workers' heartbeats can be judged (just
        back from an outage, everyone's look stale until they have flushed their backlog)."""
        return self.healthy and (now if now is not None else time.time()) - self._healthy_since >= LIVE_STALE_S

    # ---- background ----
    def _set_health(self, ok: bool) -> None:
        if ok == self.healthy:
            return
        self.healthy = ok
        if ok:
            self._healthy_since = time.time()
            self._reclaim_until = self._healthy_since + RECLAIM_CHECK_S
        metrics.REDIS_UP.set(1 if ok else 0)
        log.warning("redis_state", healthy=ok, buffered=len(self._q))
        for fn in list(self._listeners.values()):
            try:
                fn(ok)
            except Exception:  # noqa: BLE001
                log.exception("state_listener_failed")

    async def _append_late(self, args: tuple[Any, ...], kw: dict[str, Any]) -> bool:
        """An event refused for its id: a repeat of one that landed (a retried batch), or one buffered while this
        worker was cut off from Redis that another wrote after (a reaper's `call_ended`). The second is appended
        now with a new id (its `t` keeps when it happened). True when it was."""
        key, fields, eid = args[0], args[1], kw.get("id")
        try:
            if not eid or await self.r.xrange(key, min=eid, max=eid, count=1):
                return False
            await self.r.xadd(key, fields)
        except (RedisError, OSError, asyncio.TimeoutError):
            return False
        metrics.ERRORS.labels("state", "event_appended_late").inc()
        return True

    async def _writer(self) -> None:
        backoff = 0.2
        metrics.REDIS_UP.set(1)
        while True:
            if not self._q:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(self._q)[:500]
            dropped0 = self._dropped
            t0 = time.perf_counter()
            try:
                pipe = self.r.pipeline(transaction=False)
                for op, args, kw in batch:
                    getattr(pipe, op)(*args, **kw)
                results = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                metrics.ERRORS.labels("state", "redis_unavailable").inc()
                if self.healthy:
                    log.warning("redis_write_failed", error=type(exc).__name__, buffered=len(self._q))
                self._set_health(False)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            metrics.REDIS_LATENCY.labels("pipeline").observe(time.perf_counter() - t0)
            refused = next((res for res in results if _retryable(res)), None)
            if refused is not None:
                # Redis is up but refuses writes (full, read-only, loading): keep the whole batch and retry
                # it in order; every op is idempotent (events carry explicit ids), so what did land is harmless
                metrics.ERRORS.labels("state", "redis_unavailable").inc()
                if self.healthy:
                    log.warning("redis_write_failed", error=type(refused).__name__, detail=str(refused)[:120],
                                buffered=len(self._q))
                self._set_health(False)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            for (op, args, kw), res in zip(batch, results):
                if isinstance(res, Exception):
                    # A refused command is not retried: a repeated event id means it already landed ...
                    repeat = op == "xadd" and "equal or smaller" in str(res)
                    if repeat and await self._append_late(args, kw):
                        continue  # ... unless it is not there: written after what came before it, never lost
                    kind = "duplicate_suppressed" if repeat else "command_failed"
                    metrics.ERRORS.labels("state", kind).inc()
                    if kind == "command_failed":
                        log.warning("redis_command_failed", op=op, key=str(args[0]) if args else "", error=str(res))
            # ops of this batch that overflow already dropped from the head while it was in flight are gone:
            # pop only the rest, never ops queued after the batch
            for _ in range(max(0, len(batch) - (self._dropped - dropped0))):
                self._q.popleft()
            backoff = 0.2
            self._set_health(True)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if self.healthy:
                await self._sync_clock()
                await self._check_server()
                if time.time() < self._reclaim_until and self._active:
                    await self._reclaim()
            now = self.redis_now()
            if self._active:
                self._push("zadd", LIVE, {cid: now for cid in self._active})
            self._push("zadd", WORKERS, {self.worker: now})
            # workers silent for a day are gone (SIGKILLed ones never remove themselves): keep the set small
            self._push("zremrangebyscore", WORKERS, "-inf", now - 86400)
            await self._reap(time.time())  # local clock: paces reaping, compared with _healthy_since

    async def _reclaim(self) -> None:
        """Calls of ours that other workers reaped while we were cut off from Redis (a partition of this host
        longer than LIVE_STALE_S looks like a dead worker to them) are live here: their records become active
        again (the reaper's `call_ended` stays in the story, followed by `call_reclaimed`) and go back in the live
        index. Their real end, later, is written as usual."""
        from bot.reaper import OUTCOME  # bot.reaper imports this module's key schema

        for cid in list(self._active):
            try:
                by = await asyncio.wait_for(self.r.eval(_RECLAIM, 1, call_key(cid), OUTCOME, str(self.pid)), 2.0)
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                log.debug("reclaim_check_failed", call_id=cid, error=repr(exc))
                return  # the next heartbeat tries again
            if by is None or cid not in self._active:
                continue
            base = self._base.get(cid)
            if base is not None:
                self._push("zadd", LIVE, {cid: self.redis_now()})
                self._push("hset", LIVE_INFO, cid, base[1])
            self._push("persist", events_key(cid))
            self.event(cid, "call_reclaimed", reaped_by=as_str(by), worker=self.worker, worker_pid=self.pid)
            metrics.ERRORS.labels("state", "call_reclaimed").inc()
            metrics.CALLS_RECLAIMED.labels(base[0].get("transport", "unknown") if base else "unknown").inc()
            log.warning("call_reclaimed", call_id=cid, reaped_by=as_str(by),
                        hint="this worker was cut off from Redis longer than the reaper waits; the call went on")

    async def _reap(self, now: float) -> None:
        """Close calls of workers that died (SIGKILL, OOM): every worker reaps, a claim makes it once."""
        if now - self._last_reap < REAP_EVERY_S or not self.healthy:
            return
        if not self.settled(now):
            # just back from an outage: every worker's heartbeats are stale until it has flushed its own
            # backlog; reaping now would close live calls of workers still catching up (and their buffered
            # events, older than the reaper's call_ended, would then be refused by the stream)
            return
        self._last_reap = now
        if not await self.flush(timeout_s=2.0):
            return  # our own heartbeats must land (e.g. after an outage) before we judge anyone stale
        from bot.reaper import reap_orphans  # bot.reaper imports this module's key schema

        try:
            await reap_orphans(self.r, stale_s=LIVE_STALE_S, reaper=self.worker, ttl_s=self.ttl_s)
        except Exception as exc:  # noqa: BLE001 - Redis down: the next heartbeat tries again
            metrics.ERRORS.labels("state", "reap_failed").inc()
            log.warning("reap_failed", error=repr(exc))
            return
        # no pruning of old index entries here: one left by a reaper that died mid-close is the reaper's to
        # finish (its claim lease runs out); pruned unreaped, its call would stay `active` forever
