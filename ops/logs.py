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
    _route_library_logs(lvl)
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


class _LazyLogger:
    """A module-level logger that takes the configuration in force when it is used, not at import:
    binding eagerly froze structlog's defaults into every module imported before configure_logging()
    (console lines on stdout, where `bot call` prints its JSON summary)."""

    __slots__ = ("_name", "_bound", "_log")

    def __init__(self, name: str, bound: dict[str, Any]) -> None:
        self._name, self._bound = name, bound
        self._log: Any = None

    def _get(self) -> Any:
        if self._log is not None:
            return self._log
        log = structlog.get_logger(self._name).bind(logger=self._name, **self._bound)
        if _configured:  # before configuration: structlog's defaults, but not kept
            self._log = log
        return log

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._get(), attr)


def _route_library_logs(lvl: int) -> None:
    """Libraries' stdlib logging (uvicorn, asyncio, ...) and pipecat's loguru as the same JSON lines, so a log
    pipeline parses every line; uvicorn's per-WebSocket "connection open/closed" chatter is dropped."""
    handler = logging.StreamHandler(_CurrentStderr())  # type: ignore[arg-type]
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.processors.add_log_level,
                           structlog.processors.TimeStamper(fmt="iso", utc=True)],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.format_exc_info,
                    redact_processor, structlog.processors.JSONRenderer()]))
    root = logging.getLogger()
    root.addHandler(handler)  # added, not replacing: pytest's capture handlers stay
    root.setLevel(lvl)
    logging.getLogger("uvicorn.error").addFilter(
        lambda r: r.getMessage() not in ("connection open", "connection closed"))
    try:
        from loguru import logger as loguru_logger
    except ImportError:
        return

    def sink(message: Any) -> None:
        rec, exc = message.record, message.record["exception"]
        logging.getLogger(rec["name"] or "loguru").log(
            rec["level"].no, rec["message"], exc_info=(exc.type, exc.value, exc.traceback) if exc else None)

    loguru_logger.remove()
    loguru_logger.add(sink, level=lvl, format="{message}")


def get_logger(name: str, **bound: Any) -> structlog.typing.FilteringBoundLogger:
    return _LazyLogger(name, bound)  # type: ignore[return-value]
