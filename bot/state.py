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
import time
from collections import OrderedDict, deque
from typing import Any, Callable

import redis.asyncio as aioredis
from redis.exceptions import (BusyLoadingError, ClusterDownError, MasterDownError, OutOfMemoryError, ReadOnlyError,
                              RedisError, TryAgainError)

from ops import metrics
from ops.logs import get_logger, mask_digits

log = get_logger("bot.state")

LIVE = "calls:live"  # zset call_id -> last heartbeat (unix s)
LIVE_INFO = "calls:live:info"  # hash call_id -> json {worker, transport, started_at, caller_masked}
RECENT = "calls:recent"  # zset call_id -> start time (unix s), trimmed
WORKERS = "workers"  # zset worker id -> last heartbeat
RECENT_MAX = 10000
HEARTBEAT_S = 5.0
LIVE_STALE_S = 30.0
REAP_EVERY_S = 10.0  # how often each worker looks for calls orphaned by a dead worker
ENDED_IDS_MAX = 1024  # ended calls whose last event id is kept, for events that arrive after call_ended

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


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _decode(d: dict[Any, Any]) -> dict[str, str]:
    """Works whether or not the client was built with decode_responses."""
    return {_s(k): _s(v) for k, v in d.items()}


Op = tuple[str, tuple[Any, ...], dict[str, Any]]


def finite_float(v: Any) -> float | None:
    """A number read back from Redis (an event time, a duration); None for a missing, garbled or NaN one (shown as
    unknown, never a failed read)."""
    try:
        t = float(v)
    except (TypeError, ValueError):
        return None
    return t if t == t else None


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
        self.healthy = True
        self._listeners: dict[str, Callable[[bool], None]] = {}
        self._closing = False
        self._last_reap = 0.0
        self._healthy_since = 0.0  # time of the last recovery from an outage (0: never down)
        self._last_id: dict[str, tuple[int, int]] = {}  # live call id -> last event stream id (ms, seq)
        # the same for recently ended calls, bounded: a late event (a protocol error that raced the hang-up)
        # must neither reuse an id nor leave an entry behind for every call the worker ever had
        self._ended_ids: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._dropped = 0  # ops dropped from the head of the queue on overflow

    # ---- lifecycle ----
    async def start(self) -> None:
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
        self._idle.clear()
        self._wake.set()

    def start_call(self, call_id: str, transport: str, caller: str, called: str, policy_version: str,
                   extra: dict[str, Any] | None = None) -> None:
        now = time.time()
        rec = {
            "call_id": call_id, "transport": transport, "caller": caller, "caller_masked": mask_digits(caller),
            "called": called, "started_at": f"{now:.3f}", "status": "active", "outcome": "",
            "policy_version": policy_version, "worker": self.worker,
        }
        for k, v in (extra or {}).items():
            rec[k] = v if isinstance(v, str) else json.dumps(v)
        self._active.add(call_id)
        self._push("hset", call_key(call_id), mapping=rec)
        self._push("expire", call_key(call_id), self.ttl_s)
        self._push("zadd", LIVE, {call_id: now})
        self._push("hset", LIVE_INFO, call_id, json.dumps(
            {"worker": self.worker, "transport": transport, "started_at": now, "caller_masked": mask_digits(caller)}))
        self._push("zadd", RECENT, {call_id: now})
        self._push("zremrangebyrank", RECENT, 0, -RECENT_MAX - 1)
        self.event(call_id, "call_started", transport=transport, worker=self.worker, policy_version=policy_version)

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

    def end_call(self, call_id: str, outcome: str, **fields: Any) -> None:
        now = time.time()
        self.event(call_id, "call_ended", outcome=outcome, **fields)
        rec = {"status": "ended", "outcome": outcome, "ended_at": f"{now:.3f}"}
        rec.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()})
        self._push("hset", call_key(call_id), mapping=rec)
        self._push("expire", call_key(call_id), self.ttl_s)
        self._push("expire", events_key(call_id), self.ttl_s)
        self._push("zrem", LIVE, call_id)
        self._push("hdel", LIVE_INFO, call_id)
        self._active.discard(call_id)
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
        rec = _decode(await self.r.hgetall(call_key(call_id)))
        raw = await self.r.xrange(events_key(call_id))
        if not rec and not raw:
            return None
        events = []
        for eid, f in raw:
            eid, f = _s(eid), _decode(f)
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
        cutoff = time.time() - LIVE_STALE_S
        ids = [_s(i) for i in await self.r.zrangebyscore(LIVE, cutoff, "+inf")]
        if not ids:
            return []
        infos = [_s(i) if i is not None else None for i in await self.r.hmget(LIVE_INFO, ids)]
        return [{"call_id": cid, **(json.loads(i) if i else {})} for cid, i in zip(ids, infos)]

    # ---- background ----
    def _set_health(self, ok: bool) -> None:
        if ok == self.healthy:
            return
        self.healthy = ok
        if ok:
            self._healthy_since = time.time()
        metrics.REDIS_UP.set(1 if ok else 0)
        log.warning("redis_state", healthy=ok, buffered=len(self._q))
        for fn in list(self._listeners.values()):
            try:
                fn(ok)
            except Exception:  # noqa: BLE001
                log.exception("state_listener_failed")

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
            for (op, args, _kw), res in zip(batch, results):
                if isinstance(res, Exception):
                    # A refused command is not retried: a repeated event id means it already landed.
                    repeat = op == "xadd" and "equal or smaller" in str(res)
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
            now = time.time()
            if self._active:
                self._push("zadd", LIVE, {cid: now for cid in self._active})
            self._push("zadd", WORKERS, {self.worker: now})
            # workers silent for a day are gone (SIGKILLed ones never remove themselves): keep the set small
            self._push("zremrangebyscore", WORKERS, "-inf", now - 86400)
            await self._reap(now)

    async def _reap(self, now: float) -> None:
        """Close calls of workers that died (SIGKILL, OOM): every worker reaps, HSETNX makes it once."""
        if now - self._last_reap < REAP_EVERY_S or not self.healthy:
            return
        if now - self._healthy_since < LIVE_STALE_S:
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
        # index entries the reaper left (claimed by another reaper that died before its ZREM). Pruned only
        # right after a reap, never while reaping is held back (an outage): a dead worker's call pruned
        # unreaped would stay `active` forever
        self._push("zremrangebyscore", LIVE, "-inf", now - 4 * LIVE_STALE_S)
