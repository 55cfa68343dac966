"""X-Twilio-Signature checks for the webhook and for the WebSocket upgrade."""

from __future__ import annotations

from typing import Mapping
from urllib.parse import urlsplit, urlunsplit

from twilio.request_validator import RequestValidator


class SignatureChecker:
    """Disabled (always valid) when no auth token is configured."""

    def __init__(self, auth_token: str, public_url: str = "") -> None:
        self._validator = RequestValidator(auth_token) if auth_token else None
        self._public = urlsplit(public_url) if public_url else None

    @property
    def enabled(self) -> bool:
        return self._validator is not None

    def public_url(self, scheme: str, host: str, path: str, query: str) -> str:
        """The URL Twilio used: BOT_PUBLIC_URL's host when set (behind a proxy / tunnel)."""
        if self._public is not None:
            host = self._public.netloc
            if not scheme.startswith("ws"):  # webhooks: the public scheme (https behind TLS termination)
                scheme = self._public.scheme or scheme
        return urlunsplit((scheme, host, path, query, ""))

    def valid_webhook(self, url: str, form: Mapping[str, str], signature: str | None) -> bool:
        if self._validator is None:
            return True
        if not signature:
            return False
        return bool(self._validator.validate(url, dict(form), signature))

    def valid_stream(self, host: str, path: str, query: str, signature: str | None) -> bool:
        """Twilio signs the wss:// URL of the stream with no parameters."""
        if self._validator is None:
            return True
        if not signature:
            return False
        url = self.public_url("wss", host, path, query)
        return bool(self._validator.validate(url, {}, signature))
