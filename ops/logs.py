"""structlog JSON logging with redaction.

Every log line is JSON on stderr. Callers' phone numbers and card/account-like digit runs (written, separated
or spoken: "four two seven ...") and credentials (by key, or inside text: header lines, bearer tokens, query
strings) are masked by a processor, so no code path can leak them by accident (bind `call_id` per call).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

import structlog

_PHONE = re.compile(r"\+?\d[\d\s\-().]{6,}\d")
# Identifiers and machine values that merely contain digit runs: masking them would garble the very thing an
# on-call engineer greps for (Twilio SIDs, SIP Call-IDs/tags/branches, UUIDs, ISO timestamps, IPv4:port).
_PROTECTED = (
    r"\b[A-Z]{2}[0-9a-fA-F]{32}\b"  # Twilio SIDs: CA…, MZ…, AC…
    r"|\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"  # UUIDs
    r"|\bz9hG4bK[\w.\-]*"  # SIP Via branch
    r"|\b(?=[0-9a-fA-F]*[a-fA-F])(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{16,}\b"  # random hex ids (SIP Call-ID, tags)
    r"|\b(?:19|20)\d\d-[01]\d-[0-3]\d(?:[T ][0-2]\d:[0-5]\d(?::[0-5]\d(?:\.\d+)?)?(?:Z|[+-]\d\d:?\d\d)?)?"
    r"|(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?(?![\d.])"  # IPv4[:port]
)
# Digits as a caller says them and the transcript spells them ("four two seven", "double five", CTC
# misspellings like "thre"), possibly mixed with numerals: "4 two 7 ...".
_DIGIT_WORDS = {
    "zero": "0", "oh": "0", "o": "0", "one": "1", "two": "2", "to": "2", "too": "2", "three": "3", "thre": "3",
    "tree": "3", "four": "4", "for": "4", "fore": "4", "five": "5", "fiv": "5", "six": "6", "seven": "7",
    "sevn": "7", "eight": "8", "ate": "8", "nine": "9", "nin": "9", "niner": "9",
}
_DIGIT_TOKEN = r"(?:(?:double|triple)[\s\-]+)?(?:\d+|(?:" + "|".join(
    sorted(_DIGIT_WORDS, key=len, reverse=True)) + r")\b)"
_SPOKEN = rf"(?<![\w+]){_DIGIT_TOKEN}(?:(?:[\s,;\-]+|\s*,?\s*and\s+){_DIGIT_TOKEN})+"
_SCAN = re.compile(rf"(?P<keep>{_PROTECTED})|(?P<spoken>{_SPOKEN})|(?P<phone>{_PHONE.pattern})", re.IGNORECASE)
_TOKEN = re.compile(_DIGIT_TOKEN, re.IGNORECASE)
_MIN_DIGITS = 7


def _spoken_digits(run: str) -> tuple[str, bool]:
    """The digits a spoken run stands for, and whether any were said as words."""
    out, worded = [], False
    for m in _TOKEN.finditer(run):
        tok = m.group(0).lower().replace("-", " ").split()
        times = {"double": 2, "triple": 3}.get(tok[0], 1) if len(tok) > 1 else 1
        word = tok[-1]
        if word.isdigit():
            out.append(word * times if len(word) == 1 else word)
        else:
            worded = True
            out.append(_DIGIT_WORDS.get(word, "") * times)
    return "".join(out), worded


def mask_digits(text: str) -> str:
    """Mask phone/card/account-like digit runs, written or spoken, keeping the last 2 digits for support."""

    def _mask(m: re.Match[str]) -> str:
        if m.group("keep") is not None:
            return m.group(0)
        if m.group("spoken") is not None:
            digits, worded = _spoken_digits(m.group(0))
            if not worded:  # plain numerals: the written-number rule below decides
                return _PHONE.sub(_mask_written, m.group(0))
        else:
            return _mask_written(m)
        if len(digits) < _MIN_DIGITS:
            return m.group(0)
        return "*" * (len(digits) - 2) + digits[-2:]

    return _SCAN.sub(_mask, text)


def _mask_written(m: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    if len(digits) < _MIN_DIGITS:
        return m.group(0)
    return "*" * (len(digits) - 2) + digits[-2:]


_SECRET_KEYS = {"authorization", "proxy-authorization", "token", "auth_token", "password", "x-twilio-signature",
                "signature", "cookie", "set-cookie", "secret", "api_key", "apikey"}
# Any key named like a credential ("admin_token", "sip_password", "client_secret") is one too.
_SECRET_SUFFIXES = ("token", "password", "secret", "signature", "authorization", "api_key")


def _is_secret(key: Any) -> bool:
    k = str(key).lower()
    return k in _SECRET_KEYS or k.endswith(_SECRET_SUFFIXES)


def _is_identifier(key: str) -> bool:
    """Fields that name a call, a Twilio resource or a peer's software: kept verbatim so lines correlate (a SIP
    Call-ID may be all digits; masking it in `replaced_call_id` but not in `call_id` breaks the join; a PBX's
    "FPBX-16.0.33(18.13.0)" is a version, not a phone number)."""
    return key in ("timestamp", "level", "call_id", "logger", "user_agent") or key.endswith(("_call_id", "_sid"))


# Credentials inside free text: a header line as an HTTP/WebSocket/SIP trace prints it, a bearer token in an
# error message, a secret in a query string.
_SECRET_TEXT = re.compile(
    r"(?im)(^[\s<>]*(?:authorization|proxy-authorization|x-twilio-signature|cookie|set-cookie|x-admin-token)"
    r"\s*:\s*)\S.*$"
    r"|(\bbearer\s+)[\w.~+/=-]+"
    r"|([?&;](?:token|auth_token|access_token|signature|password|api_key|secret)=)[^&\s\"'<>]+")


def redact_secrets(text: str) -> str:
    return _SECRET_TEXT.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + "[redacted]", text)


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_secrets(mask_digits(value))
    if isinstance(value, dict):
        return {k: ("[redacted]" if _is_secret(k) else v if isinstance(k, str) and _is_identifier(k) else _redact(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v) for v in value)
    return value


def redact_processor(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in list(event_dict):
        if _is_secret(key):
            event_dict[key] = "[redacted]"
        elif not _is_identifier(key):
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


def _not_websocket_chatter(record: logging.LogRecord) -> bool:
    """Per-WebSocket lines with no call id: uvicorn's "connection open/closed" and "... [accepted]", and at DEBUG
    the websockets library's wire trace (every 20 ms media frame, with a slice of the caller's audio, and every
    handshake header, signatures included): ~50 lines a second per call that bury the call's own story."""
    msg = record.getMessage()
    if msg in ("connection open", "connection closed") or msg.endswith('" [accepted]'):
        return False
    return not (record.levelno <= logging.DEBUG and msg.startswith(("> ", "< ")))


def _route_library_logs(lvl: int) -> None:
    """Libraries' stdlib logging (uvicorn, asyncio, ...) and pipecat's loguru as the same JSON lines, so a log
    pipeline parses every line; uvicorn's per-WebSocket "connection open/closed" chatter is dropped."""
    handler = logging.StreamHandler(_CurrentStderr())  # type: ignore[arg-type]
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        # merge_contextvars: a library line logged inside a call's task carries its call_id too, once the call
        # binds it with structlog.contextvars.bind_contextvars
        foreign_pre_chain=[structlog.contextvars.merge_contextvars, structlog.stdlib.add_logger_name,
                           structlog.processors.add_log_level,
                           structlog.processors.TimeStamper(fmt="iso", utc=True)],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.format_exc_info,
                    redact_processor, structlog.processors.JSONRenderer()]))
    root = logging.getLogger()
    root.addHandler(handler)  # added, not replacing: pytest's capture handlers stay
    root.setLevel(lvl)
    logging.getLogger("uvicorn.error").addFilter(_not_websocket_chatter)
    if lvl >= logging.INFO:
        # httpx logs every request at INFO ("HTTP Request: POST .../Calls/CA....json 200") with no call id:
        # the bot's own transfer/webhook lines already say what happened and how it went
        logging.getLogger("httpx").setLevel(logging.WARNING)
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
