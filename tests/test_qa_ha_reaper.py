"""The reaper against a real redis-server: a restarted worker keeps its slot's id, so a dead incarnation's
calls are told from its replacement's by pid; each orphan is closed exactly once even with reapers racing
or one dying mid-close; and heartbeats use Redis's clock, so clock skew between hosts never reaps a live
call."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

import bot.state as state
from bot.reaper import CLAIM_LEASE_S, OUTCOME, reap_orphans, reap_worker, redis_time
from bot.state import LIVE, LIVE_INFO, CallStore, call_key, events_key
from tests.helpers.server import isolated_redis_url


def _client(url: str) -> aioredis.Redis:
    return aioredis.from_url(url, decode_responses=True, socket_timeout=2, socket_connect_timeout=2)


async def _fresh(url: str) -> aioredis.Redis:
    r = _client(url)
    await r.flushdb()
    return r


async def _done(r: aioredis.Redis) -> None:
    """Leave the shared logical DB empty: the next test to draw it counts the live calls in it."""
    await r.flushdb()
    await r.aclose()


async def _orphan(r: aioredis.Redis, cid: str, worker: str, pid: int, last_seen: float, **rec: str) -> None:
    await r.hset(call_key(cid), mapping={"status": "active", "outcome": "", "worker": worker,
                                         "started_at": f"{last_seen - 20:.3f}", **rec})
    await r.zadd(LIVE, {cid: last_seen})
    await r.hset(LIVE_INFO, cid, json.dumps({"worker": worker, "pid": pid, "transport": "sip",
                                             "started_at": last_seen - 20}))


async def _ended_events(r: aioredis.Redis, cid: str) -> list[dict[str, Any]]:
    return [json.loads(f["data"]) for _id, f in await r.xrange(events_key(cid)) if f["type"] == "call_ended"]


async def test_a_dead_incarnation_is_reaped_by_pid_and_its_replacement_is_not(redis_url: str) -> None:
    """The supervisor restarts a crashed worker under the same id (host-w0): closing "host-w0's calls" would
    end the replacement's live calls too; only the dead pid's are closed, at once (no 30 s wait)."""
    r = await _fresh(isolated_redis_url(redis_url))
    try:
        now = await redis_time(r)
        await _orphan(r, "CAold1", "host-w0", 111, now - 1)  # heartbeats still fresh: it died a moment ago
        await _orphan(r, "CAold2", "host-w0", 111, now - 2)
        await _orphan(r, "CAnew", "host-w0", 222, now)  # the replacement's call
        await _orphan(r, "CAother", "host-w1", 111, now)  # same pid number on another slot
        closed = await reap_worker(r, "host-w0", 111, reaper="host-supervisor", ttl_s=600)
        assert sorted(closed) == ["CAold1", "CAold2"]
        for cid in ("CAold1", "CAold2"):
            assert await r.hget(call_key(cid), "outcome") == OUTCOME
            (ended,) = await _ended_events(r, cid)
            assert ended["worker"] == "host-w0" and ended["worker_pid"] == 111 and ended["reaper"] == "host-supervisor"
            assert await r.zscore(LIVE, cid) is None and await r.hget(LIVE_INFO, cid) is None
            assert 0 < await r.ttl(events_key(cid)) <= 600
        for cid in ("CAnew", "CAother"):
            assert await r.hget(call_key(cid), "status") == "active"
        assert await reap_worker(r, "host-w0", 111) == []  # once
    finally:
        await _done(r)


async def test_a_call_record_names_its_worker_process(redis_url: str) -> None:
    import os

    url = isolated_redis_url(redis_url)
    s = CallStore(_client(url), worker="host-w3", ttl_s=600)
    await s.start()
    try:
        s.start_call("CApid", "twilio", "+15551234567", "", "1")
        assert await s.flush()
        assert await s.r.hget(call_key("CApid"), "worker_pid") == str(os.getpid())
        assert json.loads(await s.r.hget(LIVE_INFO, "CApid"))["pid"] == os.getpid()
        got = await s.get_call("CApid")
        assert got is not None and got["events"][0]["worker_pid"] == os.getpid()
        s.end_call("CApid", "completed")
        assert await s.flush()
    finally:
        await s.close()


async def test_racing_reapers_close_each_orphan_exactly_once(redis_url: str) -> None:
    url = isolated_redis_url(redis_url)
    r = await _fresh(url)
    others = [_client(url) for _ in range(3)]
    try:
        now = await redis_time(r)
        ids = [f"CArace{i}" for i in range(40)]
        for cid in ids:
            await _orphan(r, cid, "host-w1", 4242, now - 100)
        results = await asyncio.gather(*(reap_orphans(c, stale_s=30, reaper=f"w{i}", ttl_s=600)
                                         for i, c in enumerate(others)),
                                       reap_worker(r, "host-w1", 4242, reaper="sup", ttl_s=600))
        flat = [cid for res in results for cid in res]
        assert sorted(flat) == sorted(ids)  # every orphan closed, none by two reapers
        for cid in ids:
            assert len(await _ended_events(r, cid)) == 1
            assert await r.hget(call_key(cid), "status") == "ended"
        assert await r.zcard(LIVE) == 0 and await r.hlen(LIVE_INFO) == 0
    finally:
        await _done(r)
        for c in others:
            await c.aclose()


async def test_a_reaper_that_died_mid_close_is_taken_over_once(redis_url: str) -> None:
    """HSETNX used to claim a call for good: a reaper killed between its claim and its HSET left the call
    `active` forever (every other reaper skipped it, then the index entry was pruned unreaped)."""
    r = await _fresh(isolated_redis_url(redis_url))
    try:
        now = await redis_time(r)
        # claimed long ago by a reaper that died before writing anything else
        await _orphan(r, "CAclaimed", "host-w2", 7, now - 200, reaped_at=f"{now - CLAIM_LEASE_S - 5:.3f}")
        # a reaper that died after its XADD, before its HSET: the event must not be written twice
        await _orphan(r, "CAhalf", "host-w2", 7, now - 200, reaped_at=f"{now - CLAIM_LEASE_S - 5:.3f}")
        await r.xadd(events_key("CAhalf"), {"type": "call_ended", "t": f"{now - 50:.3f}",
                                            "data": json.dumps({"outcome": OUTCOME, "worker": "host-w2"})})
        # a claim in flight right now (another reaper is closing it): left to that reaper
        await _orphan(r, "CAbusy", "host-w2", 7, now - 200, reaped_at=f"{now - 1:.3f}")
        closed = await reap_orphans(r, stale_s=30, reaper="w-live", ttl_s=600)
        assert sorted(closed) == ["CAclaimed", "CAhalf"]
        for cid in ("CAclaimed", "CAhalf"):
            assert await r.hget(call_key(cid), "outcome") == OUTCOME
            assert len(await _ended_events(r, cid)) == 1
        assert await r.hget(call_key("CAbusy"), "status") == "active"
        assert await r.zscore(LIVE, "CAbusy") is not None  # not pruned: its reaper (or a successor) ends it
        assert await reap_orphans(r, stale_s=30, ttl_s=600) == []
    finally:
        await _done(r)


class _SkewedClock:
    """This process's wall clock, `offset_s` off (a host whose NTP failed); monotonic time untouched."""

    def __init__(self, offset_s: float) -> None:
        self.offset_s = offset_s

    def time(self) -> float:
        return time.time() + self.offset_s

    def perf_counter(self) -> float:
        return time.perf_counter()

    def monotonic(self) -> float:
        return time.monotonic()


@pytest.mark.parametrize("skew_s", [-90.0, 90.0])
async def test_clock_skew_between_workers_never_reaps_a_live_call(redis_url: str, monkeypatch: pytest.MonkeyPatch,
                                                                  skew_s: float) -> None:
    """Heartbeats were scored with each worker's own clock and judged with the reaper's: a worker 90 s
    behind had every live call reaped (worker_lost) within 10 s of its start; one 90 s ahead judged every
    other worker's live calls stale."""
    url = isolated_redis_url(redis_url)
    r = await _fresh(url)
    monkeypatch.setattr(state, "time", _SkewedClock(skew_s))
    s = CallStore(_client(url), worker="w-skewed", ttl_s=600)
    await s.start()
    try:
        s.start_call("CAskewed", "twilio", "+15551234567", "", "1")
        assert await s.flush()
        now = await redis_time(r)
        await r.zadd(LIVE, {"CAfair": now})  # a live call of a worker with a correct clock, just heart-beaten
        await r.hset(call_key("CAfair"), mapping={"status": "active"})
        await r.zadd(LIVE, {"CAdead": now - 100})  # a real orphan
        await r.hset(call_key("CAdead"), mapping={"status": "active"})
        assert await reap_orphans(r, stale_s=state.LIVE_STALE_S) == ["CAdead"]  # a reaper with a correct clock
        s._last_reap = s._healthy_since = 0.0
        await s._reap(time.time() + skew_s)  # the skewed worker reaps too
        assert await r.hget(call_key("CAskewed"), "status") == "active"
        assert await r.hget(call_key("CAfair"), "status") == "active"
        assert {c["call_id"] for c in await s.live_calls()} == {"CAskewed", "CAfair"}
        s.end_call("CAskewed", "completed")
        assert await s.flush()
    finally:
        await s.close()
        await _done(r)


async def test_one_garbled_orphan_does_not_stop_the_reaper_for_the_others(redis_url: str) -> None:
    """A call key of the wrong type (written by hand, another app sharing the DB) or a garbled start time used
    to raise out of the reaper on every pass: no orphan after it was ever closed."""
    r = await _fresh(isolated_redis_url(redis_url))
    try:
        now = await redis_time(r)
        await r.set(call_key("CAwrongtype"), "not a hash")
        await r.zadd(LIVE, {"CAwrongtype": now - 300})
        await _orphan(r, "CAgarbled", "host-w4", 9, now - 200)
        await r.hset(LIVE_INFO, "CAgarbled", json.dumps({"worker": "host-w4", "pid": 9, "started_at": "soon"}))
        await r.hset(call_key("CAgarbled"), "started_at", "yesterday")
        await _orphan(r, "CAfine", "host-w4", 9, now - 100)
        assert sorted(await reap_orphans(r, stale_s=30, ttl_s=600)) == ["CAfine", "CAgarbled"]
        assert await r.hget(call_key("CAgarbled"), "outcome") == OUTCOME
        (ended,) = await _ended_events(r, "CAgarbled")
        assert "duration_s" not in ended  # unknown, not a failed reap
    finally:
        await _done(r)


async def test_a_call_taken_over_by_a_new_leg_is_not_reaped(redis_url: str) -> None:
    """A Twilio call whose worker died comes back on a new stream, under the same call id, on a live worker
    (telephony/twilio/server.py, <Connect action>). A reaper that read the dead worker's index entry a moment
    before the new leg's start landed must not close the live call: the record names the new process."""
    r = await _fresh(isolated_redis_url(redis_url))
    try:
        now = await redis_time(r)
        # the record already names the new leg's process (pid 222); the index entry still the dead one (111)
        await _orphan(r, "CAback", "host-w0", 111, now - 60, worker_pid="222")
        assert await reap_worker(r, "host-w0", 111, reaper="host-supervisor", ttl_s=600) == []
        assert await reap_orphans(r, stale_s=30, reaper="host-w1", ttl_s=600) == []
        assert await r.hget(call_key("CAback"), "status") == "active"
        assert await _ended_events(r, "CAback") == []
        # the dead process's own call (its record names it) is still reaped as before
        await _orphan(r, "CAgone", "host-w0", 111, now - 60, worker_pid="111")
        assert await reap_worker(r, "host-w0", 111, reaper="host-supervisor", ttl_s=600) == ["CAgone"]
    finally:
        await _done(r)


async def test_a_worker_cut_off_from_redis_gets_its_reaped_call_back_and_loses_no_event(redis_url: str,
                                                                                          monkeypatch: pytest.MonkeyPatch
                                                                                          ) -> None:
    """A partition: worker A loses Redis while the others keep it. To them A looks dead, and a reaper closes A's
    live call `worker_lost`. A's call went on all along: when A's link comes back, the events it buffered meanwhile
    land after the reaper's end (none refused for their older ids), the record is active again (`call_reclaimed`)
    and back in the live index, and the call's real end is what the record finally says."""
    from tests.helpers.tcp_proxy import TcpProxy

    monkeypatch.setattr(state, "HEARTBEAT_S", 0.5)  # the reclaim check rides on the heartbeat
    url = isolated_redis_url(redis_url)
    r = await _fresh(url)
    host, port_db = url.split("//", 1)[1].split(":", 1)
    port, db = port_db.split("/", 1)
    proxy = await TcpProxy(host, int(port)).start()
    a = CallStore(_client(f"redis://127.0.0.1:{proxy.port}/{db}"), worker="host-a", ttl_s=3600)
    await a.start()
    from ops import metrics

    taken_back = metrics.CALLS_RECLAIMED.labels("twilio")._value.get()
    try:
        a.start_call("CApart", "twilio", "+15550001111", "+15550002222", "1")
        a.event("CApart", "turn", n=1)
        assert await a.flush(timeout_s=5)
        proxy.cut()
        a.event("CApart", "turn", n=2)  # buffered: Redis is out of A's reach
        deadline = time.monotonic() + 10
        while a.healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not a.healthy
        await asyncio.sleep(1.2)
        assert await reap_orphans(r, stale_s=1.0, reaper="host-b", ttl_s=3600) == ["CApart"]  # A looks dead
        assert await r.hget(call_key("CApart"), "outcome") == OUTCOME
        a.event("CApart", "turn", n=3)  # ... but its call goes on
        proxy.mend()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and await r.hget(call_key("CApart"), "status") != "active":
            await asyncio.sleep(0.2)
        rec = await r.hgetall(call_key("CApart"))
        assert rec["status"] == "active" and rec["outcome"] == "" and not rec.get("reaped_by"), rec
        assert await r.ttl(call_key("CApart")) == -1  # the reaper's expiry is gone with its end
        # the reaper counted it worker_lost; that count is taken back on the metrics too
        assert metrics.CALLS_RECLAIMED.labels("twilio")._value.get() == taken_back + 1
        assert await a.flush(timeout_s=5)
        assert await r.zscore(LIVE, "CApart") is not None and await r.hget(LIVE_INFO, "CApart")
        a.end_call("CApart", "caller_hangup", duration_s=42.0, turns=3)
        assert await a.flush(timeout_s=5)
    finally:
        await a.close()
        await proxy.stop()
    rec = await r.hgetall(call_key("CApart"))
    assert rec["status"] == "ended" and rec["outcome"] == "caller_hangup", rec
    events = [(f["type"], json.loads(f["data"])) for _id, f in await r.xrange(events_key("CApart"))]
    assert sorted(d["n"] for t, d in events if t == "turn") == [1, 2, 3], events  # nothing lost
    types = [t for t, _ in events]
    assert types.index("call_ended") < types.index("call_reclaimed"), types  # the reap, then taken back
    (reclaimed,) = [d for t, d in events if t == "call_reclaimed"]
    assert reclaimed["reaped_by"] == "host-b" and reclaimed["worker"] == "host-a", reclaimed
    assert [d["outcome"] for t, d in events if t == "call_ended"] == [OUTCOME, "caller_hangup"]
    await _done(r)
