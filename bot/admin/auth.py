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


def registry_of(request: Request) -> TokenRegistry:
    reg = getattr(request.app.state, "admin_tokens", None)
    if reg is None:
        try:
            reg = TokenRegistry.from_env()
        except (TokenConfigError, OSError) as exc:
            # A broken token file locks the console (fail closed) but keeps the bot answering calls.
            metrics.ERRORS.labels("admin", "token_config").inc()
            log.error("admin_tokens_invalid", error=str(exc))
            reg = TokenRegistry([])
        request.app.state.admin_tokens = reg
    return reg


async def principal(
    request: Request, creds: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Principal:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    tok = registry_of(request).lookup(creds.credentials)
    if tok is None:
        metrics.ERRORS.labels("admin", "bad_token").inc()
        log.warning("admin_auth_failed", ip=client_ip(request), path=request.url.path)
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
    return Principal(tok.name, tok.role, client_ip(request))


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
