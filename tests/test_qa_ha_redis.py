"""Call state through Redis high-availability events, with real servers: a Sentinel failover while a call is
live, a Redis restarted without its data, and a 3-node Redis Cluster whose slots move mid-call."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

import bot.state as state
from bot.reaper import reap_orphans
from bot.state import LIVE, LIVE_INFO, CallStore, call_key, connect, events_key
from ops import metrics
from tests.helpers.server import free_port

pytestmark = pytest.mark.slow
EXE = shutil.which("redis-server") or "redis-server"


def _wait_port(port: int, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def _cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=20).stdout


def _redis(port: int, d: Path, *extra: str) -> subprocess.Popen[bytes]:
    d.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([EXE, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", str(d), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port)
    return p


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


async def _until(pred, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await pred():
            return True
        await asyncio.sleep(0.1)
    return False


def _sentinel_ready(sport: int) -> bool:
    fields = _cli(sport, "SENTINEL", "master", "mymaster").split("\n")
    info = dict(zip(fields[::2], fields[1::2]))
    return info.get("flags") == "master" and info.get("num-slaves") == "1"


@pytest.fixture()
def sentinel(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """A master, a replica in sync with it and one Sentinel (quorum 1) that fails over after 1 s down."""
    mport, rport, sport = free_port(), free_port(), free_port()
    master = _redis(mport, tmp_path / "m")
    replica = _redis(rport, tmp_path / "r", "--replicaof", "127.0.0.1", str(mport), "--repl-diskless-sync-delay", "0")
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sport}\nbind 127.0.0.1\ndir {tmp_path}\nsentinel monitor mymaster 127.0.0.1 {mport} 1\n"
                    "sentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n")
    sent = subprocess.Popen([EXE, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(sport)
        deadline = time.monotonic() + 30
        while "master_link_status:up" not in _cli(rport, "INFO", "replication"):
            assert time.monotonic() < deadline, "replica never synced"
            time.sleep(0.1)
        # the Sentinel has connected to the master (flags "master", not "master,disconnected") and found its
        # replica: what the client's master discovery and the failover rely on
        while not _sentinel_ready(sport):
            assert time.monotonic() < deadline, "sentinel never saw the master and its replica"
            time.sleep(0.1)
        yield master, rport, sport
    finally:
        _stop(sent, replica, master)


async def test_sentinel_failover_with_a_live_call_loses_no_replicated_event(
        sentinel: tuple[subprocess.Popen[bytes], int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The master dies mid-call: writes fail (voicebot_redis_up 0, the call is told), Sentinel promotes the
    replica, the client follows it (redis+sentinel://), and every event is there once, in order."""
    master, rport, sport = sentinel
    monkeypatch.setattr(state, "HEARTBEAT_S", 0.3)
    s = CallStore(connect(f"redis+sentinel://127.0.0.1:{sport}/mymaster/0"), worker="w-ha", ttl_s=600)
    await s.start()
    told: list[bool] = []
    try:
        s.start_call("CAfo", "twilio", "+15551234567", "+15550000000", "1")
        s.subscribe("CAfo", told.append)
        assert await s.flush(timeout_s=10)
        n = 0
        for _ in range(10):
            s.event("CAfo", "turn", n=n)
            n += 1
            await asyncio.sleep(0.05)
        assert await s.flush(timeout_s=10)
        deadline = time.monotonic() + 10  # what the master acknowledged has reached the replica
        while time.monotonic() < deadline and "CAfo" not in _cli(rport, "KEYS", "call:*"):
            await asyncio.sleep(0.1)
        master.kill()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (told != [False, True] or not s.healthy):
            s.event("CAfo", "turn", n=n)  # the caller keeps talking through the failover
            n += 1
            await asyncio.sleep(0.1)
        assert told == [False, True] and s.healthy, told
        assert metrics.REDIS_UP._value.get() == 1
        assert "role:master" in _cli(rport, "INFO", "replication")  # the replica took over
        s.end_call("CAfo", "completed", turns=n)
        assert await s.flush(timeout_s=20)
        got = await s.get_call("CAfo")
        assert got is not None
        turns = [e["n"] for e in got["events"] if e["type"] == "turn"]
        assert turns == list(range(n))  # none lost, none twice, in order
        assert [e["type"] for e in got["events"]][0] == "call_started"
        assert got["record"]["status"] == "ended" and got["record"]["caller"] == "+15551234567"
    finally:
        await s.close(timeout_s=2)


async def test_redis_restarted_without_its_data_gets_live_calls_back(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis restarted without persistence mid-call: the record and live-index entry of the call in progress
    were gone for good (its record ended with no caller, start time or worker, and `bot calls live` could
    not say which worker held it). The worker notices the new server and writes them again."""
    monkeypatch.setattr(state, "HEARTBEAT_S", 0.2)
    port = free_port()
    proc = _redis(port, tmp_path / "r")
    s = CallStore(connect(f"redis://127.0.0.1:{port}/0"), worker="w-rs", ttl_s=600)
    await s.start()
    try:
        s.start_call("CArs", "sip", "+15551234567", "+15550000000", "4")
        assert await s.flush()
        _stop(proc)
        proc = _redis(port, tmp_path / "r")  # empty
        s.event("CArs", "turn", n=1)
        fresh = connect(f"redis://127.0.0.1:{port}/0")  # the store's pooled connections died with the old server

        async def restored() -> bool:
            return (await fresh.hget(call_key("CArs"), "caller") == "+15551234567"
                    and await fresh.hget(LIVE_INFO, "CArs") is not None)

        try:
            assert await _until(restored, 30)
        finally:
            await fresh.aclose()
        live = await s.live_calls()
        assert [c["call_id"] for c in live] == ["CArs"] and live[0]["worker"] == "w-rs"
        s.end_call("CArs", "caller_hangup", turns=1)
        assert await s.flush(timeout_s=10)
        got = await s.get_call("CArs")
        assert got is not None
        rec = got["record"]
        assert rec["status"] == "ended" and rec["outcome"] == "caller_hangup" and rec["worker"] == "w-rs"
        assert rec["policy_version"] == "4" and float(rec["started_at"]) > 0
        types = [e["type"] for e in got["events"]]
        assert "state_restored" in types and types[-1] == "call_ended"
        assert await s.r.zscore(LIVE, "CArs") is None and 0 < await s.r.ttl(call_key("CArs")) <= 600
    finally:
        await s.close(timeout_s=2)
        _stop(proc)


async def test_a_call_that_ended_just_before_the_data_was_lost_keeps_its_end(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A call ended, its end written, then Redis lost its last writes (a restart without persistence, a failover
    to a replica that had not caught up): without a replay the call would sit in the live index as active until
    the reaper closed it as worker_lost, counted a second time. The worker writes recent ends again."""
    monkeypatch.setattr(state, "HEARTBEAT_S", 0.2)
    port = free_port()
    proc = _redis(port, tmp_path / "r")
    s = CallStore(connect(f"redis://127.0.0.1:{port}/0"), worker="w-re", ttl_s=600)
    await s.start()
    try:
        s.start_call("CAre", "sip", "+15551234567", "+15550000000", "4")
        s.event("CAre", "turn", n=1)
        s.end_call("CAre", "completed", turns=1)
        assert await s.flush()
        _stop(proc)
        proc = _redis(port, tmp_path / "r")  # empty: the end is gone
        fresh = connect(f"redis://127.0.0.1:{port}/0")

        async def ended_again() -> bool:
            return await fresh.hget(call_key("CAre"), "outcome") == "completed"

        try:
            assert await _until(ended_again, 30)
            assert await fresh.zscore(LIVE, "CAre") is None and 0 < await fresh.ttl(call_key("CAre")) <= 600
            events = await fresh.xrange(f"call:CAre:events")
            assert [f["type"] for _id, f in events][-1:] == ["call_ended"]
        finally:
            await fresh.aclose()
    finally:
        await s.close(timeout_s=2)
        _stop(proc)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        p = random.randint(20000, 45000)
        try:
            for q in (p, p + 10000):
                with socket.socket() as sk:
                    sk.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


def _slot_owner(port: int, slot: int) -> tuple[dict[int, str], int, int]:
    """(node ids by port, the port owning `slot`, how many slots that node owns)."""
    ids: dict[int, str] = {}
    owner, owned = 0, 0
    for ln in _cli(port, "CLUSTER", "NODES").splitlines():
        f = ln.split()
        node_port = int(f[1].split("@")[0].rsplit(":", 1)[1])
        ids[node_port] = f[0]
        ranges = [tuple(int(x) for x in (r.partition("-")[0], r.partition("-")[2] or r.partition("-")[0]))
                  for r in f[8:] if not r.startswith("[")]
        if any(a <= slot <= b for a, b in ranges):
            owner, owned = node_port, sum(b - a + 1 for a, b in ranges)
    return ids, owner, owned


async def test_cluster_keeps_call_state_while_slots_move(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "HEARTBEAT_S", 0.2)  # the server check runs with each heartbeat
    ports = [_cluster_port() for _ in range(3)]
    procs = [_redis(p, tmp_path / str(p), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
             for p in ports]
    s = None
    try:
        out = subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports], "--cluster-yes"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        deadline = time.monotonic() + 30
        while not all("cluster_state:ok" in _cli(p, "CLUSTER", "INFO") for p in ports):
            assert time.monotonic() < deadline, "cluster never became ok"
            await asyncio.sleep(0.1)
        s = CallStore(connect(f"redis+cluster://127.0.0.1:{ports[0]}"), worker="w-cl", ttl_s=600)
        await s.start()
        assert s._server_id and s._server_id.count(",") == 2  # one run_id per node
        for i in range(12):  # keys spread over all three nodes
            s.start_call(f"CAcl{i}", "twilio", "+15551234567", "", "1")
            s.event(f"CAcl{i}", "turn", n=0)
        assert await s.flush(timeout_s=10) and s.healthy
        assert len(await s.live_calls()) == 12
        # the slot holding one call's event stream moves to another node mid-call (MOVED/ASK), with every other
        # slot of its node: the drained node drops out of the primaries, which is no server change (no data lost,
        # no RedisServerChanged page, no `state_restored` in every live call)
        changes = metrics.REDIS_SERVER_CHANGES._value.get()
        slot = int(_cli(ports[0], "CLUSTER", "KEYSLOT", events_key("CAcl5")).strip())
        ids, owner, owned = _slot_owner(ports[0], slot)
        dst = next(p for p in ports if p != owner)
        moved = await asyncio.to_thread(
            subprocess.run, ["redis-cli", "--cluster", "reshard", f"127.0.0.1:{owner}", "--cluster-from", ids[owner],
                             "--cluster-to", ids[dst], "--cluster-slots", str(owned), "--cluster-yes"],
            capture_output=True, text=True, timeout=120)
        assert moved.returncode == 0, moved.stdout[-2000:] + moved.stderr[-2000:]
        assert _slot_owner(ports[0], slot)[1] == dst

        async def drained_node_left_the_map() -> bool:
            return s is not None and (s._server_id or "").count(",") == 1

        assert await _until(drained_node_left_the_map, 10)
        for n in range(1, 6):
            s.event("CAcl5", "turn", n=n)
        s.end_call("CAcl5", "completed", turns=5)
        assert await s.flush(timeout_s=10) and s.healthy
        got = await s.get_call("CAcl5")
        assert got is not None and [e.get("n") for e in got["events"] if e["type"] == "turn"] == list(range(6))
        assert got["record"]["outcome"] == "completed"
        assert metrics.REDIS_SERVER_CHANGES._value.get() == changes
        assert not any(e["type"] == "state_restored" for e in got["events"])
        # the reaper on a cluster: a call whose worker died is closed, the others are left alone
        s._active.discard("CAcl7")  # a dead worker's call: this process knows nothing of it any more
        s._base.pop("CAcl7", None)
        await s.r.zadd(LIVE, {"CAcl7": time.time() - 100})
        assert await reap_orphans(s.r, stale_s=30, reaper="w-cl", ttl_s=600) == ["CAcl7"]
        assert await s.r.hget(call_key("CAcl7"), "outcome") == "worker_lost"
        for i in range(12):
            if i not in (5, 7):
                s.end_call(f"CAcl{i}", "completed")
        assert await s.flush(timeout_s=10)
        assert await s.r.zcard(LIVE) == 0
    finally:
        if s is not None:
            await s.close(timeout_s=2)
        _stop(*procs)
