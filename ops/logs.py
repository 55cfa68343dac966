"""structlog JSON logging with redaction.

Every log line is JSON on stderr. Callers' phone numbers and card/account-like digit runs are
masked by a processor, so no code path can leak them by accident (bind `call_id` per call).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

import structlog

_PHONE = re.compile(r"\+?\d[\d\s\-().]{6,}\d")
_SECRET_KEYS = {"authorization", "token", "auth_token", "password", "x-twilio-signature", "signature"}


def mask_digits(text: str) -> str:
    """Mask phone/card/account-like digit runs, keeping the last 2 digits for support."""

    def _mask(m: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", m.group(0))
        if len(digits) < 7:
            return m.group(0)
        return "*" * (len(digits) - 2) + digits[-2:]

    return _PHONE.sub(_mask, text)


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return mask_digits(value)
    if isinstance(value, dict):
        return {k: ("[redacted]" if str(k).lower() in _SECRET_KEYS else _redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v) for v in value)
    return value


def redact_processor(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in list(event_dict):
        if key.lower() in _SECRET_KEYS:
            event_dict[key] = "[redacted]"
        elif key not in ("timestamp", "level", "call_id", "logger"):
            event_dict[key] = _redact(event_dict[key])
    return event_dict


_configured = False


class _CurrentStderr:
    """sys.stderr looked up at each write: CLIs and pytest swap (and close) stderr after configuration."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str | None = None) -> None:
    """Idempotent: JSON lines on stderr, level from BOT_LOG_LEVEL (default INFO)."""
    global _configured
    if _configured:
        return
    lvl = getattr(logging, (level or os.environ.get("BOT_LOG_LEVEL", "INFO")).upper(), logging.INFO)
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=lvl)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_processor,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    _configured = True


def get_logger(name: str, **bound: Any) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name).bind(logger=name, **bound)
