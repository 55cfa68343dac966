"""Admission control for trunks: source-IP allowlist, digest auth, INVITE rate limit, scanner filter.

Digest (RFC 2617 / RFC 8760): nonces are stateless — an HMAC over a timestamp with a per-process
secret — so no per-source state grows when someone floods us with unauthenticated INVITEs. State is kept only
for answers with the right password: the highest nonce count seen per (nonce, cnonce), so a captured
Authorization header cannot be replayed while its nonce lives (RFC 7616 3.4.5). A nonce is only valid at the
process that signed it, so this per-process memory is the whole story.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

SCANNER_AGENTS = ("friendly-scanner", "sipvicious", "sipcli", "sip-scan", "sipscan", "iwar", "sundayddr",
                  "vaxsipuseragent", "pplsip", "smap", "sipbomber", "voipbuster", "sipsak-scan")


def is_scanner(user_agent: str, from_hdr: str) -> bool:
    ua = (user_agent + " " + from_hdr).lower()
    return any(s in ua for s in SCANNER_AGENTS)


class Allowlist:
    def __init__(self, cidrs: str) -> None:
        self.nets = [ipaddress.ip_network(c.strip(), strict=False) for c in cidrs.split(",") if c.strip()]

    def allows(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.split("%")[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr.version == n.version and addr in n for n in self.nets)

    @property
    def is_open(self) -> bool:
        """Admits the whole internet (the default with a password): being allowed says nothing of who it is."""
        return any(n.prefixlen == 0 for n in self.nets)


class TokenBucket:
    """Per-source INVITE rate limit; idle buckets are pruned so the table stays bounded."""

    def __init__(self, rate: float, burst: float, max_sources: int = 10000) -> None:
        self.rate, self.burst, self.max_sources = rate, burst, max_sources
        self._b: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._b.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._b[key] = (tokens - 1.0 if ok else tokens, now)
        if len(self._b) > self.max_sources:
            full = [k for k, (t, l) in self._b.items() if t + (now - l) * self.rate >= self.burst]
            for k in full[: len(self._b) // 2]:
                del self._b[k]
        return ok


_NC = re.compile(r"[0-9a-fA-F]{8}")
_PARAM = re.compile(r'([A-Za-z0-9_-]+)\s*=\s*("((?:[^"\\]|\\.)*)"|[^\s,]+)')


def parse_digest(header: str) -> dict[str, str]:
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "digest":
        return {}
    return {m.group(1).lower(): (m.group(3) if m.group(3) is not None else m.group(2)) for m in _PARAM.finditer(rest)}


def _h(algorithm: str, data: str) -> str:
    fn = hashlib.sha256 if algorithm.upper().startswith("SHA-256") else hashlib.md5
    return fn(data.encode()).hexdigest()


def digest_response(algorithm: str, user: str, realm: str, password: str, method: str, uri: str, nonce: str,
                    qop: str = "", nc: str = "", cnonce: str = "") -> str:
    ha1 = _h(algorithm, f"{user}:{realm}:{password}")
    ha2 = _h(algorithm, f"{method}:{uri}")
    if qop:
        return _h(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _h(algorithm, f"{ha1}:{nonce}:{ha2}")


MAX_NONCE_USES = 50_000  # (nonce, cnonce) pairs remembered; only right-password answers get here


@dataclass
class DigestAuth:
    user: str
    password: str
    realm: str = "voicebot"
    nonce_ttl_s: float = 300.0
    # (nonce, cnonce) -> highest nonce count accepted (0: an answer without qop, good once), oldest first
    _used: OrderedDict[tuple[str, str], int] = field(default_factory=OrderedDict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._secret = secrets.token_bytes(16)

    def _sign(self, ts: str) -> str:
        return hmac.new(self._secret, ts.encode(), hashlib.sha256).hexdigest()[:24]

    def challenge(self, stale: bool = False) -> str:
        ts = f"{time.time():.0f}"
        nonce = f"{ts}.{self._sign(ts)}"
        return (f'Digest realm="{self.realm}", nonce="{nonce}", algorithm=MD5, qop="auth"'
                + (", stale=true" if stale else ""))

    def verify(self, header: str, method: str) -> str:
        """'ok', 'stale' (good credentials, expired nonce: re-challenge), 'replay' (good credentials, but a
        nonce count already used: a captured header sent again; re-challenge) or 'bad'/'missing'."""
        p = parse_digest(header)
        if not p:
            return "missing"
        nonce = p.get("nonce", "")
        if p.get("username") != self.user or p.get("realm") != self.realm:
            return "bad"
        algorithm = p.get("algorithm", "MD5")
        if algorithm.upper() not in ("MD5", "SHA-256"):
            return "bad"
        if p.get("qop") and not _NC.fullmatch(p.get("nc", "")):
            return "bad"  # qop answers carry an 8-hex-digit nonce count (RFC 2617 3.2.2)
        expected = digest_response(algorithm, self.user, self.realm, self.password, method, p.get("uri", ""),
                                   nonce, p.get("qop", ""), p.get("nc", ""), p.get("cnonce", ""))
        if not hmac.compare_digest(expected, p.get("response", "")):
            return "bad"
        # The password is right. A nonce we did not sign (one from before a restart, or from another
        # instance behind the same proxy) or an expired one is 'stale' (RFC 2617 3.2.1): re-challenge,
        # do not count a trunk with the right password as a failed (or brute-forcing) login.
        ts, _, sig = nonce.partition(".")
        if not ts.isdigit() or not hmac.compare_digest(sig, self._sign(ts)):
            return "stale"
        if time.time() - int(ts) > self.nonce_ttl_s:
            return "stale"
        return "ok" if self._first_use(nonce, p) else "replay"

    def _first_use(self, nonce: str, p: dict[str, str]) -> bool:
        """Record this answer's nonce count; False when (nonce, cnonce) already had this count or a higher one.
        Request retransmissions never get here (the transaction layer answers them from its cache)."""
        if p.get("qop"):
            nc, key = int(p["nc"], 16), (nonce, p.get("cnonce", ""))
        else:
            nc, key = 0, (nonce, "")
        seen = self._used.get(key)
        if seen is not None and (nc <= seen or not p.get("qop")):
            return False
        self._used[key] = nc
        self._used.move_to_end(key)
        cutoff = time.time() - self.nonce_ttl_s
        while self._used:  # forget nonces that expired (they are refused as stale anyway), and bound the table
            (old_nonce, _), _nc = next(iter(self._used.items()))
            ts = old_nonce.partition(".")[0]
            if len(self._used) > MAX_NONCE_USES or not ts.isdigit() or int(ts) < cutoff:
                self._used.popitem(last=False)
            else:
                break
        return True


class AuthFailures:
    """Digest brute-force guard: a source with `limit` wrong answers within `window_s` is refused for
    `block_s`. Keyed by source IP; the table is bounded so a distributed attack cannot grow it forever."""

    def __init__(self, limit: int = 10, window_s: float = 60.0, block_s: float = 300.0,
                 max_sources: int = 10000) -> None:
        self.limit, self.window_s, self.block_s, self.max_sources = limit, window_s, block_s, max_sources
        self._fails: dict[str, list[float]] = {}  # source -> times of recent failures (at most `limit`)
        self._blocked: dict[str, float] = {}  # source -> monotonic time the block ends

    @property
    def enabled(self) -> bool:
        return self.limit > 0 and self.block_s > 0

    def blocked(self, key: str, now: float | None = None) -> bool:
        until = self._blocked.get(key)
        if until is None:
            return False
        if (time.monotonic() if now is None else now) < until:
            return True
        del self._blocked[key]
        return False

    def failed(self, key: str, now: float | None = None) -> bool:
        """Record one wrong answer; True when this one starts a block."""
        if not self.enabled:
            return False
        now = time.monotonic() if now is None else now
        recent = [t for t in self._fails.get(key, []) if now - t < self.window_s]
        recent.append(now)
        if len(recent) < self.limit:
            self._fails[key] = recent[-self.limit:]
            self._prune(now)
            return False
        self._fails.pop(key, None)
        self._blocked[key] = now + self.block_s
        self._prune(now)
        return True

    def succeeded(self, key: str) -> None:
        self._fails.pop(key, None)

    def _prune(self, now: float) -> None:
        # down to 90 % so a distributed attack pays for one scan per max_sources/10 sources, not per failure
        keep = int(self.max_sources * 0.9)
        if len(self._fails) > self.max_sources:
            for k in [k for k, ts in self._fails.items() if not ts or now - ts[-1] >= self.window_s]:
                del self._fails[k]
            while len(self._fails) > keep:  # all recent: forget the oldest entries
                del self._fails[next(iter(self._fails))]
        if len(self._blocked) > self.max_sources:
            for k in [k for k, until in self._blocked.items() if until <= now]:
                del self._blocked[k]
            while len(self._blocked) > keep:
                del self._blocked[next(iter(self._blocked))]


def authorization_header(challenge: str, user: str, password: str, method: str, uri: str) -> str:
    """Client side (our UAC): answer a WWW-Authenticate challenge."""
    p = parse_digest(challenge)
    algorithm = p.get("algorithm", "MD5")
    qop = "auth" if "auth" in p.get("qop", "").split(",") else ""
    cnonce, nc = secrets.token_hex(8), "00000001"
    resp = digest_response(algorithm, user, p["realm"], password, method, uri, p["nonce"], qop, nc, cnonce)
    h = (f'Digest username="{user}", realm="{p["realm"]}", nonce="{p["nonce"]}", uri="{uri}", '
         f'response="{resp}", algorithm={algorithm}')
    if qop:
        h += f', qop={qop}, nc={nc}, cnonce="{cnonce}"'
    return h
