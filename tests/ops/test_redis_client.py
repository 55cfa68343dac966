"""bot.redis_client: URL parsing for every supported form, and real connections to a plain
redis-server, a Sentinel-managed master and a one-node Redis Cluster."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from redis.asyncio.cluster import RedisCluster

from bot.redis_client import RedisUrlError, connect, parse_url
from tests.conftest import free_port


def test_parse_plain_tls_unix() -> None:
    t = parse_url("redis://:s3cret@10.0.0.5:6380/2")
    assert (t.kind, t.url) == ("single", "redis://:s3cret@10.0.0.5:6380/2")
    t = parse_url("rediss://user:pw@cache.example:6380/0?ssl_cert_reqs=none")
    assert t.kind == "single" and t.ssl and "ssl_cert_reqs=none" in t.url
    assert parse_url("unix:///run/redis.sock?db=1").kind == "single"


def test_parse_sentinel() -> None:
    t = parse_url("redis+sentinel://:pw@s1:26379,s2,[::1]:26380/mymaster/3")
    assert t.kind == "sentinel" and t.service == "mymaster" and t.db == 3 and t.password == "pw"
    assert t.sentinels == [("s1", 26379), ("s2", 26379), ("::1", 26380)]


def test_parse_cluster_forms() -> None:
    t = parse_url("redis://node1:7000/0?cluster=true&socket_keepalive=1")
    assert t.kind == "cluster" and t.url == "redis://node1:7000?socket_keepalive=1"
    assert parse_url("redis+cluster://node1:7000").url == "redis://node1:7000"
    assert parse_url("redis://node1:7000?cluster=false").kind == "single"


@pytest.mark.parametrize("bad", ["", "http://x:1", "redis+sentinel://s1:26379", "redis://h:notaport/0",
                                 "redis+sentinel://s1/master/x", "unix://"])
def test_bad_urls_are_clear_errors(bad: str) -> None:
    with pytest.raises(RedisUrlError):
        parse_url(bad)


async def test_plain_roundtrip(redis_url: str) -> None:
    r = connect(redis_url)
    try:
        await r.set("ops:rc:k", "v", ex=10)
        assert await r.get("ops:rc:k") == "v"  # decoded str, like bot.state expects
    finally:
        await r.aclose()


def _wait_port(port: int, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


@pytest.fixture()
def sentinel_setup(tmp_path: Path) -> Iterator[tuple[int, int]]:
    exe = shutil.which("redis-server")
    assert exe
    mport, sport = free_port(), free_port()
    master = subprocess.Popen([exe, "--port", str(mport), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL)
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sport}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {mport} 1\n")
    sent = subprocess.Popen([exe, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
    try:
        _wait_port(mport)
        _wait_port(sport)
        yield mport, sport
    finally:
        for p in (sent, master):
            p.terminate()
            p.wait(10)


async def test_sentinel_resolves_master(sentinel_setup: tuple[int, int]) -> None:
    mport, sport = sentinel_setup
    r = connect(f"redis+sentinel://127.0.0.1:{sport}/mymaster/0")
    try:
        await r.set("k", "via-sentinel")
        info = await r.execute_command("INFO", "server")
        assert f"tcp_port:{mport}" in str(info) or info.get("tcp_port") == mport
        assert await r.get("k") == "via-sentinel"
    finally:
        await r.aclose()


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    import random

    for _ in range(200):
        p = random.randint(20000, 45000)
        try:
            for q in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


async def test_one_node_cluster(tmp_path: Path) -> None:
    exe = shutil.which("redis-server")
    assert exe
    port = _cluster_port()
    p = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                          "--cluster-config-file", str(tmp_path / "nodes.conf"), "--save", "", "--dir", str(tmp_path)],
                         stdout=subprocess.DEVNULL)
    try:
        _wait_port(port)
        subprocess.run(["redis-cli", "-p", str(port), "CLUSTER", "ADDSLOTSRANGE", "0", "16383"], check=True,
                       capture_output=True)
        deadline = time.monotonic() + 15
        while b"cluster_state:ok" not in subprocess.run(["redis-cli", "-p", str(port), "CLUSTER", "INFO"],
                                                         capture_output=True).stdout:
            assert time.monotonic() < deadline, "cluster never became ok"
            time.sleep(0.1)
        r = connect(f"redis://127.0.0.1:{port}/0?cluster=true")
        assert isinstance(r, RedisCluster)
        try:
            await r.set("call:CA1", "x")
            pipe = r.pipeline(transaction=False)  # how bot.state writes
            pipe.hset("call:CA2", mapping={"status": "live"})
            pipe.xadd("call:CA2:events", {"type": "start"})
            await pipe.execute()
            assert await r.hget("call:CA2", "status") == "live"
        finally:
            await r.aclose()
    finally:
        p.terminate()
        p.wait(10)
