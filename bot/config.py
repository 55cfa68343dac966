"""Configuration from environment variables, with documented defaults (README lists them all)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass(frozen=True)
class Settings:
    http_host: str = field(default_factory=lambda: _env("BOT_HTTP_HOST", "0.0.0.0"))
    http_port: int = field(default_factory=lambda: _int("BOT_HTTP_PORT", 8080))
    sip_port: int = field(default_factory=lambda: _int("BOT_SIP_PORT", 5060))
    sip_enabled: bool = field(default_factory=lambda: _env("BOT_SIP_ENABLED", "1") not in ("0", "false", "no"))
    sip_retry_s: float = field(default_factory=lambda: _float("BOT_SIP_RETRY_S", 5.0))  # retry a failed SIP bind
    public_url: str = field(default_factory=lambda: _env("BOT_PUBLIC_URL", ""))  # e.g. https://abc.ngrok.app
    redis_url: str = field(default_factory=lambda: _env("REDIS_URL", ""))  # empty: embedded redis-server
    data_dir: Path = field(default_factory=lambda: Path(_env("BOT_DATA_DIR", "./var")))
    policy_path: str = field(default_factory=lambda: _env("BOT_POLICY", ""))  # empty: policies/default.yaml
    twilio_auth_token: str = field(default_factory=lambda: _env("TWILIO_AUTH_TOKEN", ""))
    twilio_account_sid: str = field(default_factory=lambda: _env("TWILIO_ACCOUNT_SID", ""))
    twilio_api_base: str = field(default_factory=lambda: _env("TWILIO_API_BASE", "https://api.twilio.com"))
    admin_token: str = field(default_factory=lambda: _env("BOT_ADMIN_TOKEN", ""))
    admin_tokens_file: str = field(default_factory=lambda: _env("BOT_ADMIN_TOKENS_FILE", ""))
    call_ttl_s: int = field(default_factory=lambda: _int("BOT_CALL_TTL_S", 7 * 24 * 3600))
    shutdown_grace_s: float = field(default_factory=lambda: _float("BOT_SHUTDOWN_GRACE_S", 30.0))
    workers: int = field(default_factory=lambda: _int("BOT_WORKERS", 1))
    engine_model_dir: str = field(default_factory=lambda: _env("BOT_ENGINE_MODEL_DIR", ""))  # empty: packaged
    engine_backend: str = field(default_factory=lambda: _env("BOT_ENGINE_BACKEND", "onnx"))
    engine_threads: int = field(default_factory=lambda: _int("BOT_ENGINE_THREADS", 1))
    worker_id: str = field(default_factory=lambda: _env("BOT_WORKER_ID", f"{os.uname().nodename}-{os.getpid()}"))
    escalation_webhook: str = field(default_factory=lambda: _env("BOT_ESCALATION_WEBHOOK", ""))


def load_settings() -> Settings:
    return Settings()
