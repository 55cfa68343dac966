"""SIP bridge settings from environment variables (telephony/ may not import bot.config)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def parse_queue_uris(spec: str) -> dict[str, str]:
    """'billing=sip:billing@10.0.0.5,retention=sip:ret@pbx' -> {name: uri}."""
    out: dict[str, str] = {}
    for part in spec.split(","):
        name, sep, uri = part.strip().partition("=")
        if sep and name.strip() and uri.strip():
            out[name.strip()] = uri.strip()
    return out


def _flag(name: str, default: str) -> bool:
    return _env(name, default).strip().lower() not in ("0", "false", "no", "off")


def _default_allow() -> str:
    # With digest credentials configured, auth protects the port: admit any source by default.
    if os.environ.get("BOT_SIP_PASSWORD"):
        return "0.0.0.0/0,::/0"
    return "127.0.0.0/8,::1/128"


@dataclass(frozen=True)
class SipSettings:
    public_ip: str = field(default_factory=lambda: _env("BOT_SIP_PUBLIC_IP", ""))  # SDP/Contact address
    rtp_port_min: int = field(default_factory=lambda: int(_env("BOT_RTP_PORT_MIN", "20000")))
    rtp_port_max: int = field(default_factory=lambda: int(_env("BOT_RTP_PORT_MAX", "30000")))
    rtp_timeout_s: float = field(default_factory=lambda: float(_env("BOT_RTP_TIMEOUT_S", "30")))
    jitter_target_frames: int = field(default_factory=lambda: int(_env("BOT_SIP_JITTER_FRAMES", "3")))
    # SRTP keyed in the SDP (SDES, RFC 4568): off (RTP/SAVP offers get 488) | optional (either) | required (plain
    # RTP offers get 488; the bot's own offers are SRTP)
    srtp: str = field(default_factory=lambda: _env("BOT_SIP_SRTP", "optional").strip().lower())
    allow: str = field(default_factory=lambda: _env("BOT_SIP_ALLOW", _default_allow()))
    user: str = field(default_factory=lambda: _env("BOT_SIP_USER", ""))
    password: str = field(default_factory=lambda: _env("BOT_SIP_PASSWORD", ""))
    realm: str = field(default_factory=lambda: _env("BOT_SIP_REALM", "voicebot"))
    invite_rate: float = field(default_factory=lambda: float(_env("BOT_SIP_INVITE_RATE", "20")))
    invite_burst: float = field(default_factory=lambda: float(_env("BOT_SIP_INVITE_BURST", "100")))
    max_calls: int = field(default_factory=lambda: int(_env("BOT_SIP_MAX_CALLS", "200")))
    queue_uris: dict[str, str] = field(default_factory=lambda: parse_queue_uris(_env("BOT_SIP_QUEUE_URIS", "")))
    transfer_fallback: str = field(default_factory=lambda: _env("BOT_SIP_TRANSFER_FALLBACK", ""))
    transfer_timeout_s: float = field(default_factory=lambda: float(_env("BOT_SIP_TRANSFER_TIMEOUT_S", "8")))
    ring_s: float = field(default_factory=lambda: float(_env("BOT_SIP_RING_S", "0")))  # 180 -> 200 delay
    # Digest brute-force guard: this many wrong answers from one source within the window -> its INVITEs
    # are dropped for block_s (0 disables)
    auth_fail_limit: int = field(default_factory=lambda: int(_env("BOT_SIP_AUTH_FAIL_LIMIT", "10")))
    auth_fail_window_s: float = field(default_factory=lambda: float(_env("BOT_SIP_AUTH_FAIL_WINDOW_S", "60")))
    auth_block_s: float = field(default_factory=lambda: float(_env("BOT_SIP_AUTH_BLOCK_S", "300")))
    # TCP from the internet: a started message must be complete within this (slowloris), and a connection
    # carrying no call is closed after this long without a complete message
    tcp_message_timeout_s: float = field(default_factory=lambda: float(_env("BOT_SIP_TCP_MESSAGE_TIMEOUT_S", "10")))
    tcp_idle_s: float = field(default_factory=lambda: float(_env("BOT_SIP_TCP_IDLE_S", "180")))
    scanner_reply: str = field(default_factory=lambda: _env("BOT_SIP_SCANNER_REPLY", "drop"))  # drop | 403
    # registration with a provider that sends calls to a registered address (telephony/sip/register.py)
    registrar: str = field(default_factory=lambda: _env("BOT_SIP_REGISTRAR", ""))  # host[:port] | sip: URI
    register_user: str = field(default_factory=lambda: _env("BOT_SIP_REGISTER_USER", ""))
    register_password: str = field(default_factory=lambda: _env("BOT_SIP_REGISTER_PASSWORD", ""))
    register_domain: str = field(default_factory=lambda: _env("BOT_SIP_REGISTER_DOMAIN", ""))  # default: registrar host
    register_expires_s: int = field(default_factory=lambda: int(_env("BOT_SIP_REGISTER_EXPIRES_S", "300")))
    # DNS servers for locating SIP servers by name (RFC 3263 NAPTR/SRV/A): "ip[:port],..."; empty: the system's
    dns_servers: str = field(default_factory=lambda: _env("BOT_SIP_DNS_SERVERS", ""))
    # SIP over TLS (telephony/sip/tls.py): a listener on tls_port (0: none), the certificate it presents, and how
    # connections we open verify their peer (CA bundle: empty = the system store)
    tls_port: int = field(default_factory=lambda: int(_env("BOT_SIP_TLS_PORT", "0")))
    tls_cert: str = field(default_factory=lambda: _env("BOT_SIP_TLS_CERT", ""))
    tls_key: str = field(default_factory=lambda: _env("BOT_SIP_TLS_KEY", ""))
    tls_ca: str = field(default_factory=lambda: _env("BOT_SIP_TLS_CA", ""))
    tls_verify: bool = field(default_factory=lambda: _flag("BOT_SIP_TLS_VERIFY", "1"))
    user_agent: str = "voicebot-sip/0.1"
