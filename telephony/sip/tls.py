"""SIP over TLS (RFC 3261 26.2, RFC 5630): the TLS contexts of our listener and of the connections we open.

The listener presents BOT_SIP_TLS_CERT / BOT_SIP_TLS_KEY. Connections we open (a registrar, a phone or trunk we
send an in-dialog request to once its own connection is gone) verify the peer's certificate against
BOT_SIP_TLS_CA (the system store by default) and its name (SNI = the host name we were given), unless
BOT_SIP_TLS_VERIFY is off (lab peers with self-signed certificates). TLS 1.2 is the oldest version spoken.
"""

from __future__ import annotations

import os
import ssl

MIN_VERSION = ssl.TLSVersion.TLSv1_2


class TlsConfigError(ValueError):
    """A TLS setting names a file that cannot be used; the message names the variable."""


def _readable(name: str, path: str) -> None:
    if not (os.path.isfile(path) and os.access(path, os.R_OK)):
        raise TlsConfigError(f"{name}={path!r}: not a readable file")


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    _readable("BOT_SIP_TLS_CERT", cert)
    _readable("BOT_SIP_TLS_KEY", key)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:  # not PEM, or a key that is not the certificate's
        raise TlsConfigError(f"BOT_SIP_TLS_CERT={cert!r} / BOT_SIP_TLS_KEY={key!r}: not a PEM certificate chain "
                             f"and its private key ({exc.reason or exc})") from None


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """The listener's context; TlsConfigError when the certificate or key is missing, unreadable or mismatched."""
    if not cert or not key:
        raise TlsConfigError("BOT_SIP_TLS_CERT and BOT_SIP_TLS_KEY must both be set for SIP over TLS "
                             "(BOT_SIP_TLS_PORT): the PEM certificate chain and the private key we present")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    _load_chain(ctx, cert, key)
    return ctx


def client_context(ca: str = "", verify: bool = True, cert: str = "", key: str = "") -> ssl.SSLContext:
    """The context of connections we open. Our certificate goes along when we have one (trunks that ask for
    mutual TLS); TlsConfigError when the CA bundle cannot be read."""
    if ca:
        _readable("BOT_SIP_TLS_CA", ca)
    try:
        ctx = ssl.create_default_context(cafile=ca or None)
    except ssl.SSLError as exc:
        raise TlsConfigError(f"BOT_SIP_TLS_CA={ca!r}: not a PEM CA bundle ({exc.reason or exc})") from None
    ctx.minimum_version = MIN_VERSION
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert and key:
        _load_chain(ctx, cert, key)
    return ctx


def reason(exc: BaseException) -> str:
    """A short, log-friendly reason for a failed handshake ('WRONG_VERSION_NUMBER', 'timeout', ...)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, (TimeoutError, ConnectionAbortedError)):
        return "timeout"
    return type(exc).__name__
