"""REDIS_URL -> an asyncio Redis client, for a single server, TLS, Sentinel or Cluster.

Accepted forms (docs/ops.md):
  redis://[user:pass@]host:6379/0            plain
  rediss://host:6380/0?ssl_cert_reqs=none    TLS (query options go to redis-py)
  unix:///run/redis.sock?db=0                local socket
  redis+sentinel://[:pass@]h1:26379,h2:26379/mymaster[/db]   master via Sentinel (follows failover)
      options: ?sentinel_password=...&sentinel_username=... (Sentinels that require auth), TLS options
      (rediss+sentinel: ssl_cert_reqs, ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_check_hostname) and
      socket_timeout / socket_connect_timeout (seconds); any other option is an error
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


_SENTINEL_AUTH = ("sentinel_password", "sentinel_username")
_TLS_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
_TIMEOUT_OPTIONS = ("socket_timeout", "socket_connect_timeout")


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
    options: dict[str, Any] = field(default_factory=dict)  # sentinel: TLS and timeout options, for every connection
    sentinel_auth: dict[str, str] = field(default_factory=dict)  # sentinel: username/password of the Sentinels


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
        if len(segs) > 2:
            raise RedisUrlError(f"redis+sentinel:// URL path is /master[/db], got {parts.path!r}")
        db = 0
        if len(segs) > 1:
            if not segs[1].isdigit():
                raise RedisUrlError(f"sentinel DB must be a number, got {segs[1]!r}")
            db = int(segs[1])
        ssl = scheme.startswith("rediss")
        options: dict[str, Any] = {}
        auth: dict[str, str] = {}
        for k, v in query:
            # redis-py's Sentinel takes no URL: an option it would never see must not be dropped silently (a
            # TLS setting ignored fails the handshake with an unrelated-looking error)
            if k in _SENTINEL_AUTH:
                auth["password" if k == "sentinel_password" else "username"] = v
            elif k in _TLS_OPTIONS and ssl:
                options[k] = v.lower() in _TRUE if k == "ssl_check_hostname" else v
            elif k in _TIMEOUT_OPTIONS:
                try:
                    options[k] = float(v)
                except ValueError as exc:
                    raise RedisUrlError(f"REDIS_URL option {k} must be a number of seconds, got {v!r}") from exc
            else:
                allowed = ", ".join(_SENTINEL_AUTH + (_TLS_OPTIONS if ssl else ()) + _TIMEOUT_OPTIONS)
                raise RedisUrlError(f"unsupported redis+sentinel:// option {k!r} (allowed: {allowed}"
                                    f"{'' if ssl else '; TLS options need rediss+sentinel://'})")
        return RedisTarget("sentinel", sentinels=hosts, service=segs[0], db=db, username=user,
                           password=password, ssl=ssl, options=options, sentinel_auth=auth)
    if scheme in ("redis+cluster", "rediss+cluster"):
        base = scheme.split("+", 1)[0]
        _split_hosts(parts.netloc, 6379)  # validate
        return RedisTarget("cluster", url=urlunsplit((base, parts.netloc, "", rest_query, "")), ssl=base == "rediss")
    if scheme in ("redis", "rediss"):
        _split_hosts(parts.netloc, 6379)
        if cluster_flag:  # cluster has a single DB: drop any /db path
            return RedisTarget("cluster", url=urlunsplit((scheme, parts.netloc, "", rest_query, "")),
                               ssl=scheme == "rediss")
        db_path = parts.path.strip("/")
        if db_path and not db_path.isdigit():
            # redis-py ignores a DB it cannot parse and uses DB 0: a typo would share another app's DB
            raise RedisUrlError(f"REDIS_URL DB must be a number (redis://host:6379/0), got {parts.path!r}")
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
    conn_kw: dict[str, Any] = {"db": t.db, **kw, **t.options}
    if t.password is not None:
        conn_kw["password"] = t.password
    if t.username is not None:
        conn_kw["username"] = t.username
    if t.ssl:
        conn_kw["ssl"] = True
    # the sentinels usually carry no auth (sentinel_password= when they do); their timeouts and TLS settings
    # matter just as much as the master's
    sentinel_kw: dict[str, Any] = {**DEFAULT_TIMEOUTS, **t.options, **t.sentinel_auth}
    if t.ssl:
        sentinel_kw["ssl"] = True
    sentinel = Sentinel(t.sentinels, sentinel_kwargs=sentinel_kw)
    return sentinel.master_for(t.service, **conn_kw)
