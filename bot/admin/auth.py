"""Bearer-token authentication with three roles for the admin API.

Tokens come from BOT_ADMIN_TOKEN (one publisher token, named "admin") and/or BOT_ADMIN_TOKENS_FILE:
either lines `role:name:token` (blank lines and `#` comments ignored) or a JSON list of
{"role": ..., "name": ..., "token": ...}. Roles are ordered: viewer < editor < publisher.
Every comparison is constant time, and tokens never reach a log line. With neither configured, `bot serve`
makes one publisher token in BOT_DATA_DIR/admin-token (ensure_local_token), so the console of a plain
`make run` can be opened by whoever can read that file.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ops import metrics
from ops.logs import get_logger

ROLES = ("viewer", "editor", "publisher")
_RANK = {r: i for i, r in enumerate(ROLES)}

log = get_logger("bot.admin.auth")


class TokenConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    ip: str = ""

    def can(self, role: str) -> bool:
        return _RANK[self.role] >= _RANK[role]


@dataclass(frozen=True)
class _Token:
    name: str
    role: str
    secret: bytes


def _check(role: str, name: str, token: str, where: str) -> _Token:
    if role not in _RANK:
        raise TokenConfigError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if not name or not token:
        raise TokenConfigError(f"{where}: name and token must not be empty")
    if len(token) < 8:
        raise TokenConfigError(f"{where}: token for {name!r} is shorter than 8 characters")
    return _Token(name, role, token.encode())


def parse_tokens_file(text: str, source: str = "tokens file") -> list[_Token]:
    stripped = text.strip()
    if stripped.startswith("[") or stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise TokenConfigError(f"{source}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        if isinstance(data, dict):
            data = data.get("tokens", [])
        if not isinstance(data, list):
            raise TokenConfigError(f"{source}: JSON must be a list of {{role, name, token}} objects")
        out = []
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                raise TokenConfigError(f"{source}: entry {i} is not an object")
            out.append(_check(str(item.get("role", "")), str(item.get("name", "")), str(item.get("token", "")), f"{source} entry {i}"))
        return out
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":", 2)
        if len(parts) != 3:
            raise TokenConfigError(f"{source} line {n}: expected role:name:token")
        out.append(_check(parts[0].strip(), parts[1].strip(), parts[2].strip(), f"{source} line {n}"))
    return out


class TokenRegistry:
    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens

    @classmethod
    def from_env(cls, admin_token: str | None = None, tokens_file: str | None = None) -> "TokenRegistry":
        admin_token = os.environ.get("BOT_ADMIN_TOKEN", "") if admin_token is None else admin_token
        tokens_file = os.environ.get("BOT_ADMIN_TOKENS_FILE", "") if tokens_file is None else tokens_file
        tokens: list[_Token] = []
        if admin_token:
            tokens.append(_check("publisher", "admin", admin_token, "BOT_ADMIN_TOKEN"))
        if tokens_file:
            try:
                text = Path(tokens_file).read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:  # not OSError: it used to escape as a 500 on every admin request
                raise TokenConfigError(f"{tokens_file}: not UTF-8 text (byte {exc.start})") from exc
            tokens += parse_tokens_file(text, tokens_file)
        seen: dict[bytes, str] = {}
        for t in tokens:  # one secret for two entries: which role it gets would depend on the file's order
            if t.secret in seen:
                raise TokenConfigError(f"the token of {t.name!r} is also the token of {seen[t.secret]!r}; "
                                       "give every entry its own token")
            seen[t.secret] = t.name
        return cls(tokens)

    @property
    def empty(self) -> bool:
        return not self._tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def lookup(self, presented: str) -> _Token | None:
        """Constant time per configured token, and every token is compared (no early exit)."""
        got = presented.encode()
        found = None
        for t in self._tokens:
            if hmac.compare_digest(got, t.secret) and found is None:
                found = t
        return found


LOCAL_TOKEN_FILE = "admin-token"


def ensure_local_token(data_dir: Path) -> Path | None:
    """No admin token configured: use (or make, once) a random publisher token kept in data_dir, readable by
    its owner only, and set BOT_ADMIN_TOKEN to it for this process and the workers it starts. Without it
    the console of a bot started with defaults refused everyone. None when tokens are configured."""
    if os.environ.get("BOT_ADMIN_TOKEN") or os.environ.get("BOT_ADMIN_TOKENS_FILE"):
        return None
    path = Path(data_dir) / LOCAL_TOKEN_FILE
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        token = ""
    if len(token) < 8:
        token = secrets.token_hex(24)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
    os.environ["BOT_ADMIN_TOKEN"] = token
    return path


_bearer = HTTPBearer(auto_error=False, description="Admin token: BOT_ADMIN_TOKEN or an entry of BOT_ADMIN_TOKENS_FILE")


def client_ip(request: Request) -> str:
    return request.client.host if request.client else ""


def _file_signature(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


RELOAD_CHECK_S = 1.0  # how often a request may stat the tokens file (a stat is microseconds; once a second is plenty)


def _load_registry() -> TokenRegistry:
    try:
        return TokenRegistry.from_env()
    except (TokenConfigError, OSError) as exc:
        # A broken token file locks the console (fail closed) but keeps the bot answering calls.
        metrics.ERRORS.labels("admin", "token_config").inc()
        log.error("admin_tokens_invalid", error=str(exc))
        return TokenRegistry([])


def registry_of(request: Request) -> TokenRegistry:
    """The app's tokens. Built from the environment on first use; a BOT_ADMIN_TOKENS_FILE that changes on disk
    is read again (checked at most once a second), so a leaked token is revoked by editing the file, without
    restarting the workers and dropping their calls. A registry set on app.state by its owner is kept as is."""
    st = request.app.state
    reg = getattr(st, "admin_tokens", None)
    path = os.environ.get("BOT_ADMIN_TOKENS_FILE", "")
    if reg is not None:
        watched = getattr(st, "admin_tokens_watch", None)
        if watched is None or not path:
            return reg
        now = time.monotonic()
        if now - watched["checked"] < RELOAD_CHECK_S:
            return reg
        watched["checked"] = now
        sig = _file_signature(path)
        if watched["path"] == path and sig == watched["sig"]:
            return reg
        reg = _load_registry()
        log.info("admin_tokens_reloaded", path=path, tokens=len(reg))
        st.admin_tokens, st.admin_tokens_watch = reg, {"path": path, "sig": sig, "checked": now}
        return reg
    sig = _file_signature(path) if path else None  # before reading: a change meanwhile is seen next time
    reg = _load_registry()
    st.admin_tokens = reg
    st.admin_tokens_watch = {"path": path, "sig": sig, "checked": time.monotonic()}
    return reg


class FailureThrottle:
    """Bad tokens per client address in a fixed window: past `limit`, that address gets 429 (before its token
    is even looked at, so guessing gains nothing) until the window ends. Per worker process, bounded memory."""

    def __init__(self, limit: int, window_s: float = 60.0, max_addresses: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._seen: dict[str, tuple[float, int]] = {}

    def retry_after(self, ip: str, now: float) -> float:
        """Seconds until `ip` may try again; 0 when it is not blocked."""
        start, n = self._seen.get(ip, (0.0, 0))
        if now - start >= self.window_s:
            return 0.0
        return self.window_s - (now - start) if n >= self.limit else 0.0

    def fail(self, ip: str, now: float) -> bool:
        """Count one bad token; True when this one reached the limit (log it once, not per request)."""
        start, n = self._seen.get(ip, (now, 0))
        if now - start >= self.window_s:
            start, n = now, 0
        if ip not in self._seen and len(self._seen) >= self.max_addresses:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
            if len(self._seen) >= self.max_addresses:  # a flood of addresses: forget the oldest half
                self._seen = dict(sorted(self._seen.items(), key=lambda kv: kv[1][0])[self.max_addresses // 2:])
        self._seen[ip] = (start, n + 1)
        return n + 1 == self.limit


def _throttle_of(request: Request) -> FailureThrottle:
    st = request.app.state
    t = getattr(st, "admin_auth_throttle", None)
    if t is None:
        t = st.admin_auth_throttle = FailureThrottle(int(os.environ.get("BOT_ADMIN_MAX_BAD_TOKENS_PER_MIN", 20)))
    return t


async def principal(
    request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Principal:
    ip, path = client_ip(request), request.url.path
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        # Not a guess (a console before sign-in, a misconfigured script), so it does not count towards the
        # lockout; it is still a refused request: counted and logged.
        metrics.ERRORS.labels("admin", "no_token").inc()
        log.info("admin_auth_missing", ip=ip, method=request.method, path=path)
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    throttle, now = _throttle_of(request), time.monotonic()
    wait = throttle.retry_after(ip, now)
    if wait > 0:
        metrics.ERRORS.labels("admin", "auth_throttled").inc()
        log.info("admin_auth_throttled", ip=ip, method=request.method, path=path, retry_after_s=round(wait))
        raise HTTPException(429, f"too many invalid tokens from this address; try again in {int(wait) + 1} s",
                            headers={"Retry-After": str(int(wait) + 1)})
    tok = registry_of(request).lookup(creds.credentials)
    if tok is None:
        metrics.ERRORS.labels("admin", "bad_token").inc()
        log.warning("admin_auth_failed", ip=ip, method=request.method, path=path)
        if throttle.fail(ip, now):
            log.warning("admin_auth_locked_out", ip=ip, failures=throttle.limit, window_s=throttle.window_s)
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
    return Principal(tok.name, tok.role, ip)


def require(role: str):  # noqa: ANN201 - a FastAPI dependency factory
    async def dep(request: Request, p: Principal = Depends(principal)) -> Principal:
        if not p.can(role):
            # Counted and logged (who tried what from where) like a bad token: a viewer's token trying
            # to publish is worth seeing.
            metrics.ERRORS.labels("admin", "forbidden").inc()
            log.warning("admin_forbidden", actor=p.name, role=p.role, needs=role, ip=p.ip,
                        method=request.method, path=request.url.path)
            raise HTTPException(403, f"role {p.role!r} may not do this; needs {role!r}")
        return p

    return dep
