"""X-Twilio-Signature checks for the webhook and for the WebSocket upgrade.

Twilio signs the exact URL it requested (scheme, host, path, query) plus the sorted POST parameters
(every value of a repeated key). Behind a reverse proxy or TLS terminator the URL we see is not that URL:
`BOT_PUBLIC_URL` (scheme, host and any path prefix the proxy strips) says what Twilio used; without it the
proxy's X-Forwarded-Proto (applied by uvicorn) and X-Forwarded-Host are used. Webhooks matched by a Twilio
Webhook Rule are signed with a SharedKey and the algorithm named in X-Twilio-Webhooks-Signature-Settings
instead of the auth token with HMAC-SHA1.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit

from twilio.request_validator import RequestValidator, get_signature_algorithm

SETTINGS_HEADER = "x-twilio-webhooks-signature-settings"
# The stream handshake's signature covers only the fixed wss:// URL, so one captured header would open streams
# forever. The webhook's TwiML therefore also hands Twilio a short-lived per-call token (a <Stream> <Parameter>)
# that comes back in `start`: a stream is a call the webhook admitted, minutes ago.
STREAM_TOKEN_PARAM = "VoicebotStreamToken"
STREAM_TOKEN_TTL_S = 300


class _MultiParams:
    """POST parameters with repeated keys, in the shape RequestValidator reads (getlist)."""

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self._d: dict[str, list[str]] = {}
        for k, v in items:
            self._d.setdefault(k, []).append(v)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def getlist(self, key: str) -> list[str]:
        return self._d[key]


class SignatureChecker:
    """Disabled (always valid) when neither an auth token nor a shared key is configured."""

    def __init__(self, auth_token: str, public_url: str = "", shared_key: str = "") -> None:
        self._validator = RequestValidator(auth_token) if auth_token else None
        self._shared = RequestValidator(shared_key) if shared_key else None
        self._public = urlsplit(public_url.strip()) if public_url.strip() else None
        self._prefix = self._public.path.rstrip("/") if self._public is not None else ""
        secret = auth_token or shared_key
        self._token_key = hmac.new(secret.encode(), b"voicebot-stream-token", hashlib.sha256).digest() if secret else b""

    @property
    def enabled(self) -> bool:
        return self._validator is not None or self._shared is not None

    def public_url(self, scheme: str, host: str, path: str, query: str) -> str:
        """The URL Twilio used: BOT_PUBLIC_URL's scheme, host and path prefix when set (behind a proxy / tunnel)."""
        if self._public is not None:
            host = self._public.netloc or host
            if not scheme.startswith("ws"):  # webhooks: the public scheme (https behind TLS termination)
                scheme = self._public.scheme or scheme
            if self._prefix and not (path == self._prefix or path.startswith(self._prefix + "/")):
                path = self._prefix + path  # the proxy stripped the prefix Twilio requested
        return urlunsplit((scheme, host, path, query, ""))

    def check(self, url: str, params: Mapping[str, str] | Iterable[tuple[str, str]], signature: str | None,
              settings_header: str | None = None) -> str:
        """'' when the request is Twilio's, else why not: missing | invalid | unsupported_algorithm |
        shared_key_not_configured."""
        if not self.enabled:
            return ""
        if not signature:
            return "missing"
        items = params.items() if isinstance(params, Mapping) else params
        multi = _MultiParams(items)
        if settings_header:  # signed with a SharedKey (a Twilio Webhook Rule matched this URL)
            if self._shared is None:
                return "shared_key_not_configured"
            algorithm = get_signature_algorithm(settings_header)
            if algorithm.upper() not in ("HMAC_SHA1", "HMAC_SHA256"):
                return "unsupported_algorithm"
            return "" if self._shared.validate(url, multi, signature, algorithm) else "invalid"
        if self._validator is None:
            return "invalid"  # only a shared key is configured: auth-token signatures are not ours to accept
        return "" if self._validator.validate(url, multi, signature) else "invalid"

    def valid_webhook(self, url: str, form: Mapping[str, str] | Iterable[tuple[str, str]],
                      signature: str | None, settings_header: str | None = None) -> bool:
        return self.check(url, form, signature, settings_header) == ""

    def stream_url(self, host: str, path: str, query: str) -> str:
        return self.public_url("wss", host, path, query)

    def valid_stream(self, host: str, path: str, query: str, signature: str | None,
                     settings_header: str | None = None) -> bool:
        """Twilio signs the wss:// URL of the stream with no parameters."""
        return self.check(self.stream_url(host, path, query), {}, signature, settings_header) == ""

    def _token_mac(self, call_sid: str, expires: int) -> str:
        mac = hmac.new(self._token_key, f"{call_sid}.{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:18]).decode()

    def stream_token(self, call_sid: str, now: float | None = None) -> str:
        """The token the webhook puts in the TwiML for this call ('' when checks are disabled)."""
        if not self._token_key:
            return ""
        expires = int((time.time() if now is None else now) + STREAM_TOKEN_TTL_S)
        return f"{expires}.{self._token_mac(call_sid, expires)}"

    @staticmethod
    def stream_token_age(token: str | None, now: float | None = None) -> float | None:
        """Seconds since the webhook issued this token (None: not a token). Only meaningful once
        check_stream_token() has accepted it: the issue time is read from its (MAC-covered) expiry."""
        exp_raw, _, _ = (token or "").partition(".")
        try:
            expires = int(exp_raw)
        except ValueError:
            return None
        return (time.time() if now is None else now) - (expires - STREAM_TOKEN_TTL_S)

    def check_stream_token(self, call_sid: str, token: str | None, now: float | None = None) -> str:
        """'' when `start` carries this call's unexpired token, else why not: missing | expired | invalid."""
        if not self._token_key:
            return ""
        if not token:
            return "missing"
        exp_raw, _, mac = token.partition(".")
        try:
            expires = int(exp_raw)
        except ValueError:
            return "invalid"
        if not hmac.compare_digest(mac, self._token_mac(call_sid, expires)):
            return "invalid"
        if expires < (time.time() if now is None else now):
            return "expired"
        return ""
