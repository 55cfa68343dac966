"""Configuration from environment variables, with documented defaults (README lists them all)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A setting's environment variable holds a value the bot cannot use; the message names it."""


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    return default if not raw else raw not in ("0", "false", "no", "off")


def _number(name: str, default: float, kind: type, lo: float | None, hi: float | None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return kind(default)
    try:
        value = kind(raw.strip())
    except ValueError:
        # a typo like BOT_HTTP_PORT=80a or BOT_CALL_TTL_S=7d must say which variable, not raise a traceback
        raise ConfigError(f"{name}={raw!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ConfigError(f"{name}={raw!r}: must be {bounds}")
    return value


def _float(name: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
    return float(_number(name, default, float, lo, hi))


def _int(name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
    return int(_number(name, default, int, lo, hi))


def _http_url(name: str, raw: str) -> str:
    raw = raw.strip()
    if raw and not raw.lower().startswith(("http://", "https://")):
        # without this, a typo'd URL fails every hand-off at call time instead of at start
        raise ConfigError(f"{name}={raw!r}: expected an http:// or https:// URL")
    return raw


@dataclass(frozen=True)
class Settings:
    http_host: str = field(default_factory=lambda: _env("BOT_HTTP_HOST", "0.0.0.0"))
    http_port: int = field(default_factory=lambda: _int("BOT_HTTP_PORT", 8080, 0, 65535))
    sip_port: int = field(default_factory=lambda: _int("BOT_SIP_PORT", 5060, 0, 65535))
    sip_enabled: bool = field(default_factory=lambda: _flag("BOT_SIP_ENABLED", True))
    sip_retry_s: float = field(default_factory=lambda: _float("BOT_SIP_RETRY_S", 5.0, 0.1))  # retry a failed SIP bind
    public_url: str = field(default_factory=lambda: _env("BOT_PUBLIC_URL", ""))  # e.g. https://abc.ngrok.app
    redis_url: str = field(default_factory=lambda: _env("REDIS_URL", ""))  # empty: embedded redis-server
    data_dir: Path = field(default_factory=lambda: Path(_env("BOT_DATA_DIR", "./var")))
    policy_path: str = field(default_factory=lambda: _env("BOT_POLICY", ""))  # empty: policies/default.yaml
    twilio_auth_token: str = field(default_factory=lambda: _env("TWILIO_AUTH_TOKEN", ""))
    twilio_account_sid: str = field(default_factory=lambda: _env("TWILIO_ACCOUNT_SID", ""))
    twilio_api_base: str = field(default_factory=lambda: _env("TWILIO_API_BASE", "https://api.twilio.com"))
    admin_token: str = field(default_factory=lambda: _env("BOT_ADMIN_TOKEN", ""))
    admin_tokens_file: str = field(default_factory=lambda: _env("BOT_ADMIN_TOKENS_FILE", ""))
    call_ttl_s: int = field(default_factory=lambda: _int("BOT_CALL_TTL_S", 7 * 24 * 3600, 1))
    shutdown_grace_s: float = field(default_factory=lambda: _float("BOT_SHUTDOWN_GRACE_S", 30.0, 0))
    workers: int = field(default_factory=lambda: _int("BOT_WORKERS", 1, 1))
    engine_model_dir: str = field(default_factory=lambda: _env("BOT_ENGINE_MODEL_DIR", ""))  # empty: packaged
    engine_backend: str = field(default_factory=lambda: _env("BOT_ENGINE_BACKEND", "onnx"))
    engine_threads: int = field(default_factory=lambda: _int("BOT_ENGINE_THREADS", 1, 1))
    worker_id: str = field(default_factory=lambda: _env("BOT_WORKER_ID", f"{os.uname().nodename}-{os.getpid()}"))
    escalation_webhook: str = field(  # http(s) URL; empty: no webhook
        default_factory=lambda: _http_url("BOT_ESCALATION_WEBHOOK", _env("BOT_ESCALATION_WEBHOOK", "")))
    escalation_webhook_secret: str = field(default_factory=lambda: _env("BOT_ESCALATION_WEBHOOK_SECRET", ""))
    escalation_webhook_timeout_s: float = field(
        default_factory=lambda: _float("BOT_ESCALATION_WEBHOOK_TIMEOUT_S", 5.0, 0.1))
    escalation_webhook_attempts: int = field(
        default_factory=lambda: _int("BOT_ESCALATION_WEBHOOK_ATTEMPTS", 5, 1, 20))
    escalation_webhook_max_pending: int = field(
        default_factory=lambda: _int("BOT_ESCALATION_WEBHOOK_MAX_PENDING", 1000, 1))


def load_settings() -> Settings:
    return Settings()
