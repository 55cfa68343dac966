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


def test_parse_sentinel_options() -> None:
    t = parse_url("rediss+sentinel://app:pw@s1/mymaster/1?sentinel_password=sp&ssl_cert_reqs=none&socket_timeout=5")
    assert t.ssl and t.username == "app" and t.password == "pw" and t.db == 1
    assert t.sentinel_auth == {"password": "sp"} and t.options == {"ssl_cert_reqs": "none", "socket_timeout": 5.0}


# each of these used to be accepted and then ignored: a DB typo silently shared DB 0 with whatever else lives
# there, a TLS option on a sentinel URL was dropped (the handshake then failed for no visible reason)
@pytest.mark.parametrize("bad", ["", "http://x:1", "redis+sentinel://s1:26379", "redis://h:notaport/0",
                                 "redis+sentinel://s1/master/x", "unix://", "redis://h:6379/zero",
                                 "redis://h:6379/0/1", "redis+sentinel://s1/master/0/extra",
                                 "redis+sentinel://s1/master?ssl_cert_reqs=none", "redis+sentinel://s1/master?foo=1",
                                 "redis+sentinel://s1/master?socket_timeout=slow"])
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


@pytest.fixture()
def secured_sentinel(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A master that admits only the ACL user `bot`, behind a Sentinel that requires a password."""
    exe = shutil.which("redis-server")
    assert exe
    mport, sport = free_port(), free_port()
    master = subprocess.Popen([exe, "--port", str(mport), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path),
                               "--user", "default", "off", "--user", "bot", "on", ">b0t-pw", "~*", "&*", "+@all",
                               "--user", "sentinel", "on", ">sent-pw", "allcommands", "allkeys", "allchannels"],
                              stdout=subprocess.DEVNULL)
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sport}\nbind 127.0.0.1\nrequirepass s3ntinel\n"
                    f"sentinel monitor mymaster 127.0.0.1 {mport} 1\n"
                    "sentinel auth-user mymaster sentinel\nsentinel auth-pass mymaster sent-pw\n")
    sent = subprocess.Popen([exe, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
    try:
        _wait_port(mport)
        _wait_port(sport)
        yield mport, sport
    finally:
        for p in (sent, master):
            p.terminate()
            p.wait(10)


async def test_acl_user_db_and_sentinel_password(secured_sentinel: tuple[int, int]) -> None:
    import redis.exceptions

    mport, sport = secured_sentinel
    r = connect(f"redis+sentinel://bot:b0t-pw@127.0.0.1:{sport}/mymaster/3?sentinel_password=s3ntinel")
    direct = connect(f"redis://bot:b0t-pw@127.0.0.1:{mport}/3")
    try:
        await r.set("k", "acl")
        assert await direct.get("k") == "acl"  # same master, same DB 3
        assert await direct.execute_command("ACL", "WHOAMI") == "bot"
    finally:
        await r.aclose()
        await direct.aclose()
    bad = connect(f"redis+sentinel://bot:b0t-pw@127.0.0.1:{sport}/mymaster/3")  # the Sentinel refuses us
    try:
        with pytest.raises(redis.exceptions.RedisError):
            await bad.set("k", "x")
    finally:
        await bad.aclose()


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


async def test_sentinel_over_tls_with_a_self_signed_certificate(tmp_path: Path) -> None:
    """rediss+sentinel://...?ssl_cert_reqs=none: the option used to be dropped, so a self-signed certificate
    (staging, a private CA not installed) failed verification with no hint that the URL said otherwise."""
    exe = shutil.which("redis-server")
    assert exe and shutil.which("openssl")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    tls = ["tls-cert-file", str(cert), "tls-key-file", str(key), "tls-ca-cert-file", str(cert),
           "tls-auth-clients", "no"]
    mport, sport = free_port(), free_port()
    master = subprocess.Popen([exe, "--port", "0", "--tls-port", str(mport), "--bind", "127.0.0.1", "--save", "",
                               "--dir", str(tmp_path), *[f"--{a}" if i % 2 == 0 else a for i, a in enumerate(tls)]],
                              stdout=subprocess.DEVNULL)
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port 0\ntls-port {sport}\nbind 127.0.0.1\ntls-replication yes\n"
                    + "".join(f"{tls[i]} {tls[i + 1]}\n" for i in range(0, len(tls), 2))
                    + f"sentinel monitor mymaster 127.0.0.1 {mport} 1\n")
    sent = subprocess.Popen([exe, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
    try:
        _wait_port(mport)
        _wait_port(sport)
        r = connect(f"rediss+sentinel://127.0.0.1:{sport}/mymaster/0?ssl_cert_reqs=none")
        try:
            await r.set("k", "over-tls")
            assert await r.get("k") == "over-tls"
        finally:
            await r.aclose()
    finally:
        for p in (sent, master):
            p.terminate()
            p.wait(10)
