"""On-call sees a Redis failover or restart even when no write ever failed: a forced/manual Sentinel failover
(SENTINEL FAILOVER) lets the old master acknowledge writes until it is demoted and the client moves on without an
error, so voicebot_redis_up stays 1; only the server's run_id changes. voicebot_redis_server_changes_total counts
it (alert RedisServerChanged). And a worker exports the series its alerts take increase() of at 0 from the start,
so the first call or error after a deploy is not lost to increase()."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

import bot.state as state
from bot.state import CallStore, connect
from ops import metrics
from tests.helpers.server import free_port
from tests.test_qa_ha_redis import _cli, _redis, _stop, sentinel  # noqa: F401 - sentinel is a fixture

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _changes() -> float:
    return metrics.REDIS_SERVER_CHANGES._value.get()


async def test_forced_sentinel_failover_is_counted(sentinel: tuple[subprocess.Popen[bytes], int, int],  # noqa: F811
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _master, rport, sport = sentinel
    monkeypatch.setattr(state, "HEARTBEAT_S", 0.3)
    s = CallStore(connect(f"redis+sentinel://127.0.0.1:{sport}/mymaster/0"), worker="w-ff", ttl_s=600)
    await s.start()
    try:
        s.start_call("CAff", "twilio", "+15551234567", "+15550000000", "1")
        assert await s.flush(timeout_s=10)
        first = s._server_id
        await asyncio.sleep(1.0)  # a few heartbeats on the same server: nothing counted
        before = _changes()
        assert s._server_id == first
        deadline = time.monotonic() + 30
        while True:  # the Sentinel may not have discovered the replica yet (NOGOODSLAVE): ask again
            out = await asyncio.to_thread(_cli, sport, "SENTINEL", "FAILOVER", "mymaster")
            if "OK" in out or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert "OK" in out, out
        n = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _changes() == before:
            s.event("CAff", "turn", n=n)  # the caller keeps talking through the switch
            n += 1
            await asyncio.sleep(0.1)
        assert _changes() == before + 1, "the failover was never counted"
        assert "role:master" in await asyncio.to_thread(_cli, rport, "INFO", "replication")
        assert s._server_id != first
        await asyncio.sleep(1.5)  # more heartbeats on the new master: counted once, no flip-flop back
        assert _changes() == before + 1
        s.end_call("CAff", "completed", turns=n)
        assert await s.flush(timeout_s=20) and s.healthy
    finally:
        await s.close(timeout_s=2)


async def test_redis_restart_is_counted_and_a_steady_server_is_not(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "HEARTBEAT_S", 0.2)
    port = free_port()
    proc = _redis(port, tmp_path / "r")
    s = CallStore(connect(f"redis://127.0.0.1:{port}/0"), worker="w-rc", ttl_s=600)
    await s.start()
    try:
        before = _changes()  # the first server a worker sees is no change
        s.start_call("CArc", "sip", "+15551234567", "+15550000000", "1")
        assert await s.flush()
        await asyncio.sleep(1.0)
        assert _changes() == before
        _stop(proc)
        proc = _redis(port, tmp_path / "r")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _changes() == before:
            s.event("CArc", "turn", n=1)
            await asyncio.sleep(0.2)
        assert _changes() == before + 1
        s.end_call("CArc", "caller_hangup")
        assert await s.flush(timeout_s=10)
    finally:
        await s.close(timeout_s=2)
        _stop(proc)


_WORKER = textwrap.dedent("""
    from ops import metrics

    def samples():
        return {s.name + repr(sorted(s.labels.items())) for m in metrics.CALLS_STARTED.collect() for s in m.samples}

    assert not any("sip" in s for s in samples()), "import created labelled series"
    metrics.init_series()  # what bot/app.py runs at worker start (a real bot serve: tests/ops/test_qa2_series_at_start.py)
""")


def test_worker_start_exports_alerted_series_at_zero(tmp_path: Path) -> None:
    """Multiprocess mode, as `bot serve --workers N` runs: a worker that has taken no call yet already exports
    calls started per transport, the main outcomes and the error kinds alerts read, all 0."""
    mp = tmp_path / "prom"
    mp.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    r = subprocess.run([sys.executable, "-c", _WORKER], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg, path=str(mp))
    text = generate_latest(reg).decode()
    want = [f'voicebot_calls_started_total{{transport="{t}"}} 0.0' for t in metrics.TRANSPORTS]
    want += [f'voicebot_calls_total{{outcome="{o}",transport="{t}"}} 0.0'
             for t in metrics.TRANSPORTS for o in ("completed", "caller_hangup", "transferred")]
    want += ['voicebot_errors_total{component="escalation_webhook",kind="failed"} 0.0',
             'voicebot_errors_total{component="state",kind="redis_unavailable"} 0.0',
             "voicebot_redis_server_changes_total 0.0"]
    missing = [w for w in want if w not in text]
    assert not missing, missing


def test_init_series_keeps_counted_values() -> None:
    c = metrics.CALLS_STARTED.labels("twilio")
    v = c._value.get()
    c.inc()
    metrics.init_series()
    assert c._value.get() == v + 1


async def test_cluster_replica_restart_is_no_server_change_but_a_failover_is(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes only go to a cluster's primaries: a replica restarting is no change of the servers behind the
    connection (no ticket, no `state_restored` in every live call), and while it is down the primaries are still
    watched; a replica promoted over its primary is a change."""
    from tests.test_qa_ha_redis import _cluster_port

    monkeypatch.setattr(state, "HEARTBEAT_S", 0.2)
    ports = [_cluster_port() for _ in range(6)]

    def node(p: int) -> subprocess.Popen[bytes]:
        return _redis(p, tmp_path / str(p), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                      "--cluster-node-timeout", "2000")

    procs = {p: node(p) for p in ports}
    s = None
    try:
        out = await asyncio.to_thread(subprocess.run, ["redis-cli", "--cluster", "create",
                                                       *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", "1",
                                                       "--cluster-yes"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        deadline = time.monotonic() + 60
        while True:  # every node ok and every replica's link up
            infos = [await asyncio.to_thread(_cli, p, "INFO", "replication") for p in ports]
            oks = [await asyncio.to_thread(_cli, p, "CLUSTER", "INFO") for p in ports]
            replicas = [p for p, i in zip(ports, infos) if "role:slave" in i]
            if (all("cluster_state:ok" in o for o in oks) and len(replicas) == 3
                    and all("master_link_status:up" in i for i in infos if "role:slave" in i)):
                break
            assert time.monotonic() < deadline, "cluster never became ok"
            await asyncio.sleep(0.2)
        s = CallStore(connect(f"redis+cluster://127.0.0.1:{ports[0]}"), worker="w-clr", ttl_s=600)
        await s.start()
        first = s._server_id
        assert first and first.count(",") == 2  # one run_id per primary
        s.start_call("CAclr", "twilio", "+15551234567", "", "1")
        assert await s.flush(timeout_s=10)
        before = _changes()
        replica = replicas[0]
        _stop(procs[replica])
        await asyncio.sleep(1.0)  # heartbeats while the replica is down
        procs[replica] = node(replica)
        deadline = time.monotonic() + 30
        while "master_link_status:up" not in await asyncio.to_thread(_cli, replica, "INFO", "replication"):
            assert time.monotonic() < deadline, "restarted replica never resynced"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        assert _changes() == before and s._server_id == first
        # each replica in turn takes over from its primary (a manual cluster failover): another server behind the
        # writes, counted once. Nothing is written meanwhile but the heartbeats, so for a shard that holds none of
        # their keys no redirect ever tells the client: the check itself must notice its map of primaries is stale
        for n, promoted in enumerate(replicas):
            before = _changes()
            out2 = await asyncio.to_thread(_cli, promoted, "CLUSTER", "FAILOVER")
            assert "OK" in out2, out2
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and _changes() == before:
                await asyncio.sleep(0.2)
            assert _changes() == before + 1, f"failover {n + 1} (port {promoted}) was never counted"
            await asyncio.sleep(1.0)  # more heartbeats on the new primary: no flip-flop
            assert _changes() == before + 1
            assert s._server_id and s._server_id.count(",") == 2
            s.event("CAclr", "turn", n=n)
        s.end_call("CAclr", "completed")
        assert await s.flush(timeout_s=10)
    finally:
        if s is not None:
            await s.close(timeout_s=2)
        _stop(*procs.values())
