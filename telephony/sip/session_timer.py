"""Session timers (RFC 4028), UAS side: what a trunk asks for in its INVITE, and our part of keeping it.

Many SBCs and carriers put `Session-Expires` (and `Supported: timer`, sometimes `Require: timer`) on every INVITE
and tear a call down when no refresh comes within the interval; one that requires the extension got a 420 before.
The side named `refresher` re-INVITEs or UPDATEs before half the interval has passed; the other ends the call
(BYE) when no refresh came by the interval minus min(32 s, a third of it). Either request carries the session on
with its own Session-Expires (the interval may change there). This module is the negotiation; the call
(telephony/sip/call.py) runs the clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from telephony.sip.message import SipMessage, header_params

MIN_SE_S = 90  # the smallest interval we accept (RFC 4028 4: 90 s minimum); a smaller one gets 422 + Min-SE


@dataclass(frozen=True)
class Terms:
    interval_s: int
    refresher: str  # "uac": the phone refreshes, "uas": we do

    def header(self) -> str:
        return f"{self.interval_s};refresher={self.refresher}"

    def refresh_after_s(self) -> float:
        """When the refresher sends its refresh (RFC 4028 10: half the interval is recommended)."""
        return self.interval_s / 2

    def expire_after_s(self) -> float:
        """When the other side gives up on a refresh (RFC 4028 10)."""
        return self.interval_s - min(32.0, self.interval_s / 3)


class IntervalTooSmall(ValueError):
    """The requested interval is under MIN_SE_S: answer 422 with Min-SE."""


def _tags(msg: SipMessage, name: str) -> set[str]:
    return {t.strip().lower() for v in msg.get_all(name) for t in v.split(",") if t.strip()}


def supports_timer(msg: SipMessage) -> bool:
    return "timer" in _tags(msg, "Supported") | _tags(msg, "Require")


def requested(msg: SipMessage, default_refresher: str = "uac") -> Terms | None:
    """The terms a request (INVITE, re-INVITE or UPDATE) asks for; None when it carries no Session-Expires (or
    an unreadable one: ignored, as if absent). IntervalTooSmall when it asks for less than MIN_SE_S.
    The refresher it names is kept; unnamed, the phone refreshes if it supports the extension (RFC 4028 9),
    otherwise we do (it cannot be asked to)."""
    raw = msg.get("Session-Expires").strip()
    if not raw:
        return None
    value = raw.split(";", 1)[0].strip()
    if not value.isdigit() or len(value) > 10:
        return None
    interval = int(value)
    if interval < MIN_SE_S:
        raise IntervalTooSmall(str(interval))
    refresher = header_params(raw).get("refresher", "").lower()
    if refresher not in ("uac", "uas"):
        refresher = default_refresher if supports_timer(msg) else "uas"
    return Terms(interval, refresher)
