"""Configuration from environment variables, with documented defaults (README lists them all)."""

from __future__ import annotations

import os
import shutil
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
    # a restarted worker 0 re-INVITEs the SIP calls its previous process lost this recently (0: never)
    sip_resume_window_s: float = field(default_factory=lambda: _float("BOT_SIP_RESUME_WINDOW_S", 60.0, 0.0))
    # another host's worker 0 silent in Redis this long (and not answering SIP as itself): its SIP calls are
    # re-INVITEd from here (0: only its own restart takes them)
    sip_takeover_after_s: float = field(default_factory=lambda: _float("BOT_SIP_TAKEOVER_AFTER_S", 15.0, 0.0))
    public_url: str = field(default_factory=lambda: _env("BOT_PUBLIC_URL", ""))  # e.g. https://abc.ngrok.app
    redis_url: str = field(default_factory=lambda: _env("REDIS_URL", ""))  # empty: embedded redis-server
    data_dir: Path = field(default_factory=lambda: Path(_env("BOT_DATA_DIR", "./var")))
    policy_path: str = field(default_factory=lambda: _env("BOT_POLICY", ""))  # empty: policies/default.yaml
    twilio_auth_token: str = field(default_factory=lambda: _env("TWILIO_AUTH_TOKEN", ""))
    twilio_account_sid: str = field(default_factory=lambda: _env("TWILIO_ACCOUNT_SID", ""))
    twilio_api_base: str = field(default_factory=lambda: _env("TWILIO_API_BASE", "https://api.twilio.com"))
    twilio_api_key: str = field(default_factory=lambda: _env("TWILIO_API_KEY", ""))  # SK...: REST auth instead
    twilio_api_secret: str = field(default_factory=lambda: _env("TWILIO_API_SECRET", ""))  # of the auth token
    twilio_webhook_shared_key: str = field(default_factory=lambda: _env("TWILIO_WEBHOOK_SHARED_KEY", ""))
    twilio_dial_caller_id: str = field(default_factory=lambda: _env("BOT_TWILIO_DIAL_CALLER_ID", ""))
    twilio_dial_timeout_s: int = field(default_factory=lambda: _int("BOT_TWILIO_DIAL_TIMEOUT_S", 0, 0, 600))
    # proxies whose X-Forwarded-For/-Proto are believed (client address for the admin audit and lockout)
    forwarded_allow_ips: str = field(default_factory=lambda: _env("BOT_FORWARDED_ALLOW_IPS", "127.0.0.1"))
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


# Settings other modules read with a bare int()/float() (telephony/ and engine/ may not import this module):
# checked here when `bot serve` starts, so a typo is one line naming the variable instead of a traceback
# from deep inside the app's start-up (or an abort) a minute later. (kind, lowest, highest); None: unbounded.
_NUMBERS: dict[str, tuple[type, float | None, float | None]] = {
    "BOT_EMBEDDED_REDIS_PORT": (int, 0, 65535),
    "BOT_MAX_CALL_S": (float, 1, None), "BOT_NO_INPUT_S": (float, 0.1, None),
    "BOT_FILLER_AFTER_S": (float, 0, None), "BOT_SILENCE_BUDGET_S": (float, 0, None),
    "BOT_ENGINE_TIMEOUT_S": (float, 0.01, None), "BOT_EOT_TIMEOUT_S": (float, 0.01, None),
    "BOT_TRANSFER_WAIT_S": (float, 0, None),
    "BOT_VAD_THRESHOLD": (float, 0, 1), "BOT_VAD_GATE_DBFS": (float, None, 0),
    "BOT_SPEECH_START_MS": (float, 0, None), "BOT_BARGE_IN_MS": (float, 0, None),
    "BOT_ECHO_MARGIN_DB": (float, None, None), "BOT_MIN_TURN_SPEECH_MS": (float, 0, None),
    "BOT_MAX_TURN_S": (float, 0.1, None), "BOT_SHUTDOWN_END_S": (float, 0, None), "BOT_EOT_MIN_SILENCE_MS": (float, 0, None),
    "BOT_EOT_MAX_SILENCE_MS": (float, 0, None), "BOT_EOT_THRESHOLD": (float, 0, 1),
    "BOT_TWILIO_LEAD_MS": (int, 0, None), "BOT_TWILIO_MAX_BAD_MESSAGES": (int, 0, None),
    "BOT_ENGINE_FEATURE_THREADS": (int, 0, None), "BOT_ENGINE_WORKERS": (int, 1, None),
    "BOT_ENGINE_BATCH_WAIT_MS": (float, 0, None), "BOT_ENGINE_MAX_BATCH": (int, 1, None),
    "BOT_ENGINE_MAX_QUEUE": (int, 1, None),
    "BOT_VOICE_THREADS": (int, 1, None), "BOT_VOICE_BURST_THREADS": (int, 0, None),
    "BOT_VOICE_WORKERS": (int, 1, None), "BOT_VOICE_CACHE_SIZE": (int, 0, None),
    "BOT_VOICE_MAX_CHARS": (int, 1, None), "BOT_VOICE_CLAUSE_CACHE": (int, 0, None), "BOT_VOICE_DISK_CACHE_MAX": (int, 0, None),
    "BOT_TRITON_TIMEOUT_S": (float, 0.01, None),
    "BOT_RTP_PORT_MIN": (int, 1, 65535), "BOT_RTP_PORT_MAX": (int, 1, 65535), "BOT_RTP_TIMEOUT_S": (float, 0.1, None),
    "BOT_SIP_JITTER_FRAMES": (int, 0, None), "BOT_SIP_INVITE_RATE": (float, 0, None),
    "BOT_SIP_INVITE_BURST": (float, 0, None), "BOT_SIP_MAX_CALLS": (int, 0, None),
    "BOT_SIP_TRANSFER_TIMEOUT_S": (float, 0, None), "BOT_SIP_RING_S": (float, 0, None),
    "BOT_SIP_REGISTER_EXPIRES_S": (int, 30, None), "BOT_SIP_TLS_PORT": (int, 0, 65535),
    "BOT_ADMIN_MAX_UPLOAD_BYTES": (int, 1, None), "BOT_ADMIN_MAX_BAD_TOKENS_PER_MIN": (int, 0, None),
    "BOT_AUDIT_MAXLEN": (int, 100, None),
}
# settings with a fixed set of values (compared case-insensitively, as their readers do)
_CHOICES: dict[str, tuple[str, ...]] = {
    "BOT_LOG_LEVEL": ("debug", "info", "warning", "error", "critical"),
    "BOT_ENGINE_BACKEND": ("onnx", "torch", "tensorrt", "triton", "auto"),  # engine.backends.BACKENDS
    "BOT_ENGINE_INT8_GRAPH": ("auto", "portable", "vnni"),  # engine.graphs.CHOICES
    "BOT_VOICE": ("piper", "espeak"),
    "BOT_ENGINE_FAULT": ("none", "understand", "end_of_turn", "speak", "all"),
    "BOT_SIP_SCANNER_REPLY": ("drop", "403"),
    "BOT_SIP_SRTP": ("off", "optional", "required"),  # telephony.sip.srtp.MODES
    "BOT_SHUTDOWN_ACTION": ("transfer", "goodbye", "hangup"),  # bot.conversation.SHUTDOWN_ACTIONS
}
_FLAGS = ("BOT_SIP_ENABLED", "BOT_VOICE_DISK_CACHE", "BOT_ENGINE_ADAPTIVE_BATCH", "BOT_SIP_TLS_VERIFY")
_FLAG_WORDS = ("1", "0", "true", "false", "yes", "no", "on", "off")


def _writable_dir(path: Path) -> str | None:
    """Why the bot could not keep its data under `path` (None if it can); creates it, as the bot would."""
    if path.exists() and not path.is_dir():
        return "not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create it ({exc.strerror or exc})"
    if not os.access(path, os.W_OK | os.X_OK):
        return "not writable by this user"
    return None


def validate_environment() -> Settings:
    """Every BOT_* setting `bot serve` uses, checked before anything starts: ConfigError naming the first bad one."""
    settings = load_settings()
    for name, (kind, lo, hi) in _NUMBERS.items():
        _number(name, 0, kind, lo, hi)
    for name, allowed in _CHOICES.items():
        raw = os.environ.get(name, "").strip()
        if raw and raw.lower() not in allowed:
            raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(allowed)}")
    for name in _FLAGS:
        raw = os.environ.get(name, "").strip()
        if raw and raw.lower() not in _FLAG_WORDS:
            raise ConfigError(f"{name}={raw!r}: expected 1 or 0 (true/false, yes/no, on/off)")
    lo, hi = _int("BOT_RTP_PORT_MIN", 20000), _int("BOT_RTP_PORT_MAX", 30000)
    if lo > hi:
        raise ConfigError(f"BOT_RTP_PORT_MIN={lo} is above BOT_RTP_PORT_MAX={hi}")
    for name, path in (("BOT_POLICY", settings.policy_path), ("BOT_ADMIN_TOKENS_FILE", settings.admin_tokens_file)):
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ConfigError(f"{name}={path!r}: not a readable file")
    if settings.engine_model_dir and not os.path.isdir(settings.engine_model_dir):
        raise ConfigError(f"BOT_ENGINE_MODEL_DIR={settings.engine_model_dir!r}: not a directory")
    if not settings.redis_url.strip() and shutil.which("redis-server") is None:
        # e.g. `docker run voicebot` alone: the image has no redis-server, compose gives it REDIS_URL
        raise ConfigError("REDIS_URL is empty and there is no redis-server on PATH to embed: set REDIS_URL "
                          "(redis://HOST:6379/0) or install redis-server (scripts/setup.sh)")
    from telephony.twilio.rest import TwilioConfigError, check_api_base

    try:
        check_api_base(settings.twilio_api_base)
    except TwilioConfigError as exc:
        raise ConfigError(str(exc)) from None
    if bool(settings.twilio_api_key) != bool(settings.twilio_api_secret):
        raise ConfigError("TWILIO_API_KEY and TWILIO_API_SECRET go together: set both or neither")
    if (why := _writable_dir(settings.data_dir)) is not None:
        raise ConfigError(f"BOT_DATA_DIR={str(settings.data_dir)!r}: {why}")
    registrar = os.environ.get("BOT_SIP_REGISTRAR", "").strip()
    if registrar:
        from telephony.sip.register import Registrar

        try:
            proto = Registrar.parse(registrar).proto
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not os.environ.get("BOT_SIP_REGISTER_USER", "").strip():
            raise ConfigError("BOT_SIP_REGISTRAR is set but BOT_SIP_REGISTER_USER is not: the account to register")
        if proto == "TLS" and not _int("BOT_SIP_TLS_PORT", 0):
            raise ConfigError("BOT_SIP_REGISTRAR is a TLS registrar but BOT_SIP_TLS_PORT is 0: the provider's calls "
                              "come to the TLS listener we register")
    _check_sip_tls(settings.sip_port)
    from telephony.sip.locate import parse_servers

    try:
        parse_servers(os.environ.get("BOT_SIP_DNS_SERVERS", ""))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return settings


def _check_sip_tls(sip_port: int) -> None:
    """The TLS listener's certificate and key load and match; the CA bundle is readable (telephony/sip/tls.py)."""
    from telephony.sip.tls import TlsConfigError, client_context, server_context

    port = _int("BOT_SIP_TLS_PORT", 0)
    cert, key = os.environ.get("BOT_SIP_TLS_CERT", ""), os.environ.get("BOT_SIP_TLS_KEY", "")
    if port and port == sip_port:
        raise ConfigError(f"BOT_SIP_TLS_PORT={port}: the same as BOT_SIP_PORT (TCP listens there); 5061 is usual")
    if port and not (cert and key):
        raise ConfigError(f"BOT_SIP_TLS_PORT={port}: needs BOT_SIP_TLS_CERT and BOT_SIP_TLS_KEY (the PEM certificate "
                          "chain and private key the TLS listener presents)")
    try:
        if port or cert or key:  # without a listener they are still our client certificate (mutual TLS)
            server_context(cert, key)
        client_context(os.environ.get("BOT_SIP_TLS_CA", ""))
    except TlsConfigError as exc:
        raise ConfigError(str(exc)) from None
