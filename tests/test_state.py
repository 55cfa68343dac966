"""bot/state.py against a real redis-server: record, event stream, live index, TTL, outage buffering,
and the embedded redis-server that `bot serve` starts without REDIS_URL."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from bot.redis_embedded import EmbeddedRedis
from bot.state import LIVE, CallStore, call_key, events_key
from tests.helpers.server import free_port, isolated_redis_url


async def _store(url: str, ttl: int = 3600) -> CallStore:
    s = CallStore(aioredis.from_url(url, decode_responses=True, socket_timeout=1, socket_connect_timeout=1),
                  worker="w-test", ttl_s=ttl)
    await s.start()
    return s


async def test_call_record_events_live_index_and_ttl(redis_url: str) -> None:
    url = isolated_redis_url(redis_url)
    s = await _store(url, ttl=120)
    try:
        s.start_call("CAtest1", "twilio", "+15551234567", "+15550000000", "3", extra={"stream_sid": "MZ1"})
        s.event("CAtest1", "turn", n=1, intent="pay_bill", confidence=0.93, decision={"action": "answer"})
        assert await s.flush()
        live = await s.live_calls()
        assert [c["call_id"] for c in live] == ["CAtest1"] and live[0]["worker"] == "w-test"
        assert live[0]["caller_masked"].endswith("67") and "1234567" not in live[0]["caller_masked"]
        s.end_call("CAtest1", "completed", turns=1)
        assert await s.flush()
        got = await s.get_call("CAtest1")
        assert got is not None
        rec, events = got["record"], got["events"]
        assert rec["status"] == "ended" and rec["outcome"] == "completed" and rec["policy_version"] == "3"
        assert rec["caller"] == "+15551234567" and rec["worker"] == "w-test" and rec["stream_sid"] == "MZ1"
        assert [e["type"] for e in events] == ["call_started", "turn", "call_ended"]
        assert events[1]["intent"] == "pay_bill" and events[1]["decision"]["action"] == "answer"
        assert await s.live_calls() == []
        assert 0 < await s.r.ttl(call_key("CAtest1")) <= 120
        assert 0 < await s.r.ttl(events_key("CAtest1")) <= 120
    finally:
        await s.close()


async def test_how_a_call_ended_is_known_here_without_redis(redis_url: str) -> None:
    """Twilio asks "what next" the moment a stream closes, possibly during a Redis outage: the worker that had
    the call answers from what it remembers (the bot hanging up, then the outcome), and a leg back on this
    worker is live again. A resumed leg keeps the first leg's start and gets call_resumed."""
    url = isolated_redis_url(redis_url)
    s = await _store(url)
    try:
        s.start_call("CAlocal", "twilio", "+15551234567", "+15550000000", "3")
        assert s.local_end("CAlocal") is None
        s.mark_ending("CAlocal", "completed")
        assert s.local_end("CAlocal") == ("ending", "completed")
        s.end_call("CAlocal", "completed")
        assert s.local_end("CAlocal") == ("ended", "completed")
        assert await s.flush()
        started = await s.r.hget(call_key("CAlocal"), "started_at")
        assert await s.r.hget(call_key("CAlocal"), "ending") == "completed"
        s.start_call("CAlocal", "twilio", "+15551234567", "+15550000000", "3", leg=2)
        assert s.local_end("CAlocal") is None
        assert await s.flush()
        rec = await s.r.hgetall(call_key("CAlocal"))
        assert rec["status"] == "active" and rec["leg"] == "2" and rec["ending"] == "" and rec["outcome"] == ""
        assert rec["started_at"] == started  # the call's start, not the new leg's
        types = [f["type"] for _id, f in await s.r.xrange(events_key("CAlocal"))]
        assert types == ["call_started", "call_ended", "call_resumed"], types
    finally:
        await s.close()


def _start_redis(port: int, d: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                             "127.0.0.1", "--dir", str(d), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis did not start")


async def test_redis_outage_buffers_then_flushes_in_order(tmp_path: Path) -> None:
    port = free_port()
    proc = _start_redis(port, tmp_path)
    s = await _store(f"redis://127.0.0.1:{port}/0")
    told: list[bool] = []
    try:
        s.start_call("CAout", "twilio", "+15557654321", "", "1")
        s.subscribe("CAout", told.append)
        assert await s.flush()
        proc.terminate()
        proc.wait(10)
        for i in range(5):
            s.event("CAout", "turn", n=i)
        for _ in range(100):  # the writer notices the outage
            if not s.healthy:
                break
            await asyncio.sleep(0.05)
        assert not s.healthy and told == [False]
        assert not await s.flush(timeout_s=0.5)  # still buffered, nothing lost
        proc = _start_redis(port, tmp_path)
        assert await s.flush(timeout_s=10)
        assert s.healthy and told == [False, True]
        got = await s.get_call("CAout")
        assert got is not None
        # the record written before the outage is gone with that redis (no persistence); the
        # buffered events arrived, in order
        assert [e["n"] for e in got["events"] if e["type"] == "turn"] == [0, 1, 2, 3, 4]
    finally:
        await s.close(timeout_s=1)
        proc.terminate()
        proc.wait(10)


async def test_heartbeat_keeps_live_calls_fresh(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import bot.state as state

    monkeypatch.setattr(state, "HEARTBEAT_S", 0.1)
    s = await _store(isolated_redis_url(redis_url))
    try:
        import time

        await s.r.zadd(state.WORKERS, {"host-123-killed": time.time() - 2 * 86400})  # SIGKILLed two days ago
        s.start_call("CAhb", "sip", "", "", "1")
        await s.flush()
        first = await s.r.zscore(LIVE, "CAhb")
        await asyncio.sleep(0.4)
        await s.flush()
        assert await s.r.zscore(LIVE, "CAhb") > first
        assert await s.r.zscore(state.WORKERS, "w-test") is not None
        assert await s.r.zscore(state.WORKERS, "host-123-killed") is None  # long-gone workers are pruned
    finally:
        s.end_call("CAhb", "completed")
        await s.close()


def test_embedded_redis_persists_with_aof(tmp_path: Path) -> None:
    import redis

    emb = EmbeddedRedis(tmp_path)
    url = emb.start()
    try:
        r = redis.Redis.from_url(url)
        r.set("k", "v")
        assert r.config_get("appendonly")["appendonly"] == "yes"
    finally:
        emb.stop()
    emb2 = EmbeddedRedis(tmp_path)
    url2 = emb2.start()
    try:
        assert redis.Redis.from_url(url2).get("k") == b"v"  # survived the restart via the AOF
    finally:
        emb2.stop()
    assert emb2.proc is not None and emb2.proc.poll() is not None


async def test_a_dead_workers_calls_are_reaped_once_and_events_are_not_duplicated(redis_url: str) -> None:
    """A surviving worker closes calls whose owner stopped heart-beating (SIGKILL); a repeated event
    write (a retried pipeline) is refused by Redis instead of duplicating the event."""
    url = isolated_redis_url(redis_url)
    dead = await _store(url)
    alive = await _store(url)
    try:
        dead.start_call("CAdead", "sip", "+15551234567", "+15550000000", "1")
        alive.start_call("CAlive", "twilio", "+15557654321", "+15550000000", "1")
        assert await dead.flush() and await alive.flush()
        stale = time.time() - 120  # the dead worker's last heartbeat, long ago
        await alive.r.zadd(LIVE, {"CAdead": stale})
        await alive._reap(time.time())
        got = await alive.get_call("CAdead")
        assert got is not None and got["record"]["outcome"] == "worker_lost" and got["record"]["status"] == "ended"
        assert (await alive.get_call("CAlive"))["record"]["status"] == "active"  # its own call untouched
        # Replaying the exact same XADD (what a retried pipeline does) is refused, not duplicated.
        alive.event("CAlive", "turn", n=1)
        op = alive._q[-1]
        assert await alive.flush()
        n = await alive.r.xlen(events_key("CAlive"))
        alive._push(op[0], *op[1], **op[2])
        assert await alive.flush()
        assert await alive.r.xlen(events_key("CAlive")) == n
    finally:
        await dead.close()
        await alive.close()


async def _until(pred, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_call_that_starts_while_redis_is_down_is_told(tmp_path: Path) -> None:
    """The policy's Redis-down rule (apology + transfer) applies to calls that start during an outage
    too: they used to be told nothing (no up/down transition while they lived)."""
    port = free_port()
    proc = _start_redis(port, tmp_path)
    s = await _store(f"redis://127.0.0.1:{port}/0")
    try:
        proc.terminate()
        proc.wait(10)
        s.event("CAbefore", "turn", n=1)
        assert await _until(lambda: not s.healthy)
        told: list[bool] = []
        s.start_call("CAduring", "twilio", "+15557654321", "", "1")
        s.subscribe("CAduring", told.append)
        assert await _until(lambda: told == [False], 2.0), told
    finally:
        await s.close(timeout_s=0.5)
        proc.terminate()
        proc.wait(10)


async def test_redis_full_keeps_events_buffered_and_flushes_once_it_has_room(tmp_path: Path) -> None:
    """maxmemory reached (noeviction): Redis refuses writes with OOM. The writer used to drop each refused
    command (the call's turns and its call_ended lost, the record left `active` forever, unreapable since
    the allowed ZREM/HDEL had taken it out of the live index) while voicebot_redis_up stayed 1."""
    import redis as sync_redis

    port = free_port()
    proc = _start_redis(port, tmp_path)
    s = await _store(f"redis://127.0.0.1:{port}/0")
    admin = sync_redis.Redis(port=port)
    told: list[bool] = []
    try:
        s.start_call("CAfull", "twilio", "+15557654321", "", "1")
        s.subscribe("CAfull", told.append)
        assert await s.flush()
        admin.config_set("maxmemory", max(1, int(admin.info("memory")["used_memory"]) - 100_000))
        for i in range(3):
            s.event("CAfull", "turn", n=i)
        assert await _until(lambda: not s.healthy)
        assert told == [False]  # the conversation is told, as for an outage: apology + transfer
        s.end_call("CAfull", "completed", turns=3)
        assert not await s.flush(timeout_s=0.3)  # buffered, not dropped
        admin.config_set("maxmemory", 0)
        assert await s.flush(timeout_s=10) and s.healthy and told == [False]  # the call had ended: no listener
        got = await s.get_call("CAfull")
        assert got is not None and got["record"]["status"] == "ended" and got["record"]["outcome"] == "completed"
        types = [e["type"] for e in got["events"]]
        assert types == ["call_started", "turn", "turn", "turn", "call_ended"], types
    finally:
        admin.close()
        await s.close(timeout_s=0.5)
        proc.terminate()
        proc.wait(10)


async def test_no_reaping_right_after_an_outage_while_other_workers_catch_up(tmp_path: Path) -> None:
    """After an outage every worker's heartbeats in Redis are stale until it has flushed its own
    backlog. A worker that recovered first used to reap the live calls of a worker still in its retry
    backoff: a spurious worker_lost, and that worker's buffered events (older ids than the reaper's
    call_ended) refused by the stream as "duplicates", i.e. lost."""
    import bot.state as state

    port = free_port()
    proc = _start_redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    a, b = await _store(url), await _store(url)
    b.worker = "w-b"
    try:
        a.start_call("CAa", "twilio", "+15557654321", "", "1")
        assert await a.flush()
        proc.terminate()
        proc.wait(10)
        a.event("CAa", "state_degraded")
        b.update("CAb-none", x=1)
        assert await _until(lambda: not a.healthy and not b.healthy)
        assert a._task is not None
        a._task.cancel()  # worker A is still in its backoff when B recovers
        proc = _start_redis(port, tmp_path)
        assert await b.flush(timeout_s=10) and b.healthy
        await b.r.zadd(LIVE, {"CAa": time.time() - 120})  # A's heartbeats: older than the outage
        await b.r.hset(call_key("CAa"), mapping={"status": "active", "started_at": f"{time.time() - 130:.3f}"})
        b._last_reap = 0.0
        await b._reap(time.time())
        assert await b.r.hget(call_key("CAa"), "status") == "active"  # not reaped while A catches up
        a._task = asyncio.get_running_loop().create_task(a._writer())
        a.end_call("CAa", "completed", turns=0)
        assert await a.flush(timeout_s=10)
        got = await a.get_call("CAa")
        assert got is not None and got["record"]["outcome"] == "completed"
        assert [e["type"] for e in got["events"]] == ["state_degraded", "call_ended"]  # none refused
        # once recovered for longer than a heartbeat can stay stale, B reaps as before
        b._healthy_since -= state.LIVE_STALE_S + 1
        await b.r.zadd(LIVE, {"CAorphan": time.time() - 120})
        b._last_reap = 0.0
        await b._reap(time.time())
        assert await b.r.hget(call_key("CAorphan"), "outcome") == "worker_lost"
        assert 0 < await b.r.ttl(events_key("CAorphan")) <= b.ttl_s  # the reaped stream expires too
    finally:
        await a.close(timeout_s=0.5)
        await b.close(timeout_s=0.5)
        proc.terminate()
        proc.wait(10)


async def test_a_dead_workers_call_is_not_pruned_unreaped_after_a_long_outage(redis_url: str,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The heartbeat used to prune live-index entries older than 120 s on every beat, reaping or not: a
    dead worker's call whose entry aged past that during an outage (reaping is held back then) was dropped
    from the index unreaped, and its record stayed `active` forever."""
    import bot.state as state

    monkeypatch.setattr(state, "HEARTBEAT_S", 0.05)
    s = await _store(isolated_redis_url(redis_url))
    try:
        await s.r.hset(call_key("CAold"), mapping={"status": "active", "started_at": f"{time.time() - 400:.3f}"})
        await s.r.zadd(LIVE, {"CAold": time.time() - 300})  # its worker died during a long outage
        s._healthy_since = time.time()  # this worker just came back from that outage
        await asyncio.sleep(0.5)  # many heartbeats
        await s.flush()
        assert await s.r.zscore(LIVE, "CAold") is not None
        assert await s.r.hget(call_key("CAold"), "status") == "active"
        s._healthy_since -= state.LIVE_STALE_S + 1
        s._last_reap = 0.0
        for _ in range(40):
            if await s.r.hget(call_key("CAold"), "status") == "ended":
                break
            await asyncio.sleep(0.05)
        assert await s.r.hget(call_key("CAold"), "outcome") == "worker_lost"
        assert await s.r.zscore(LIVE, "CAold") is None
    finally:
        await s.r.delete(call_key("CAold"), events_key("CAold"))
        await s.close()


def test_cluster_primaries_changed_tells_a_failover_from_a_reshard() -> None:
    from bot.state import _promoted_from, cluster_primaries_changed as changed

    known = {"a:1": ("run-a", ""), "b:1": ("run-b", ""), "c:1": ("run-c", "")}
    assert not changed(known, dict(known))
    assert not changed(known, {"a:1": ("run-a", ""), "b:1": ("run-b", "")})  # c drained of its slots / not mapped
    assert not changed(known, {**known, "d:1": ("run-d", "")})  # a fresh node given slots
    assert changed(known, {**known, "c:1": ("run-c2", "")})  # c restarted (its data may be gone)
    assert changed(known, {"a:1": ("run-a", ""), "b:1": ("run-b", ""), "r:1": ("run-r", "repl-c")})  # r took over c
    # a server promoted before we first looked is no news; promoted again (a failback) it is
    seen = {**known, "r:1": ("run-r", "repl-c")}
    assert not changed(seen, dict(seen))
    assert changed(seen, {**seen, "r:1": ("run-r", "repl-c2")})
    assert _promoted_from(0) == "" and _promoted_from("0" * 40) == "" and _promoted_from("ab12") == "ab12"
