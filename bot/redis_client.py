"""REDIS_URL -> an asyncio Redis client, for a single server, TLS, Sentinel or Cluster.

Accepted forms (docs/ops.md):
  redis://[user:pass@]host:6379/0            plain
  rediss://host:6380/0?ssl_cert_reqs=none    TLS (query options go to redis-py)
  unix:///run/redis.sock?db=0                local socket
  redis+sentinel://[:pass@]h1:26379,h2:26379/mymaster[/db]   master via Sentinel (follows failover)
  redis://host:7000?cluster=true  or  redis+cluster://host:7000   Redis Cluster

Parsing is a pure function (`parse_url`) so it is testable without a server; `connect` builds the
client. Every client decodes responses and times out in seconds, not minutes: call state must
never hang a call when Redis stalls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel

DEFAULT_TIMEOUTS: dict[str, float] = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
_TRUE = {"1", "true", "yes", "on"}


class RedisUrlError(ValueError):
    """REDIS_URL is malformed or uses an unsupported scheme."""


@dataclass(frozen=True)
class RedisTarget:
    kind: str  # "single" | "sentinel" | "cluster"
    url: str = ""  # for single/cluster: the URL handed to redis-py (cluster flag removed)
    sentinels: list[tuple[str, int]] = field(default_factory=list)
    service: str = ""  # sentinel master name
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False


def _split_hosts(netloc: str, default_port: int) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    user = password = None
    if "@" in netloc:
        cred, _, netloc = netloc.rpartition("@")
        u, sep, p = cred.partition(":")
        user = unquote(u) or None
        password = unquote(p) if sep else None
        if not sep:  # "secret@host": a bare token is a password, as redis-py reads it
            user, password = None, unquote(u)
    hosts: list[tuple[str, int]] = []
    for part in filter(None, netloc.split(",")):
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            port = rest.lstrip(":")
        else:
            host, _, port = part.rpartition(":") if part.count(":") == 1 else (part, "", "")
        if not host:
            raise RedisUrlError(f"REDIS_URL host missing in {part!r}")
        try:
            hosts.append((host, int(port) if port else default_port))
        except ValueError as exc:
            raise RedisUrlError(f"REDIS_URL port is not a number in {part!r}") from exc
    if not hosts:
        raise RedisUrlError("REDIS_URL has no host")
    return user, password, hosts


def parse_url(url: str) -> RedisTarget:
    if not url or not url.strip():
        raise RedisUrlError("REDIS_URL is empty")
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    query = parse_qsl(parts.query, keep_blank_values=True)
    cluster_flag = any(k == "cluster" and v.lower() in _TRUE for k, v in query)
    rest_query = urlencode([(k, v) for k, v in query if k != "cluster"])
    if scheme in ("redis+sentinel", "rediss+sentinel", "sentinel"):
        user, password, hosts = _split_hosts(parts.netloc, 26379)
        segs = [s for s in parts.path.split("/") if s]
        if not segs:
            raise RedisUrlError("redis+sentinel:// URL needs the master name: redis+sentinel://host:26379/mymaster")
        db = 0
        if len(segs) > 1:
            if not segs[1].isdigit():
                raise RedisUrlError(f"sentinel DB must be a number, got {segs[1]!r}")
            db = int(segs[1])
        return RedisTarget("sentinel", sentinels=hosts, service=segs[0], db=db, username=user,
                           password=password, ssl=scheme.startswith("rediss"))
    if scheme in ("redis+cluster", "rediss+cluster"):
        base = scheme.split("+", 1)[0]
        _split_hosts(parts.netloc, 6379)  # validate
        return RedisTarget("cluster", url=urlunsplit((base, parts.netloc, "", rest_query, "")), ssl=base == "rediss")
    if scheme in ("redis", "rediss"):
        _split_hosts(parts.netloc, 6379)
        if cluster_flag:  # cluster has a single DB: drop any /db path
            return RedisTarget("cluster", url=urlunsplit((scheme, parts.netloc, "", rest_query, "")),
                               ssl=scheme == "rediss")
        return RedisTarget("single", url=urlunsplit((scheme, parts.netloc, parts.path, rest_query, "")),
                           ssl=scheme == "rediss")
    if scheme == "unix":
        if not parts.path:
            raise RedisUrlError("unix:// URL needs a socket path")
        return RedisTarget("single", url=url.strip())
    raise RedisUrlError(f"unsupported REDIS_URL scheme {parts.scheme!r} "
                        "(redis, rediss, unix, redis+sentinel, redis+cluster)")


def connect(url: str, **overrides: Any) -> Any:
    """A redis.asyncio.Redis (single or Sentinel-managed master) or RedisCluster for `url`.
    Connections are lazy: nothing is dialled until the first command."""
    t = parse_url(url)
    kw: dict[str, Any] = {"decode_responses": True, **DEFAULT_TIMEOUTS, **overrides}
    if t.kind == "single":
        return aioredis.from_url(t.url, **kw)
    if t.kind == "cluster":
        return RedisCluster.from_url(t.url, **kw)
    conn_kw: dict[str, Any] = {"db": t.db, **kw}
    if t.password is not None:
        conn_kw["password"] = t.password
    if t.username is not None:
        conn_kw["username"] = t.username
    if t.ssl:
        conn_kw["ssl"] = True
    # the sentinels themselves usually carry no auth; their timeouts matter just as much
    sentinel = Sentinel(t.sentinels, sentinel_kwargs={**DEFAULT_TIMEOUTS, "ssl": t.ssl} if t.ssl else dict(DEFAULT_TIMEOUTS))
    return sentinel.master_for(t.service, **conn_kw)
