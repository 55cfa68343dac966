"""A SIP call carried on by a new process after the one that answered it died.

The dialog is the caller's phone's and ours; our half of it is a handful of values (tags, CSeq, remote target,
route set, transport, SDP origin, the codec in use). `SipCall.resume_state()` writes them down (the bot keeps them in
the call's record, bot/sip_recovery.py); `resume(server, snap, leg)` rebuilds the SipCall on a restarted worker and
sends the phone a re-INVITE inside the same dialog (RFC 3261 14) offering the new process's RTP port. The phone
answers 200 and its audio comes to the new port; the conversation then carries on from the record. A phone that
has hung up meanwhile answers 481 (or nothing): the call stays ended. `hang_up(server, snap)` ends a dialog the
new process will not carry on (the bot was saying goodbye when its process died) with a BYE instead.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ops.logs import get_logger
from telephony.sip import session_timer
from telephony.sip.call import SNAPSHOT_VERSION, SipCall
from telephony.sip.message import SipMessage, SipParseError, addr_uri, parse_message
from telephony.sip.sdp import SUPPORTED, SdpError, SdpSession, negotiate_answer, parse_sdp
from telephony.sip.server import ALLOW, Peer, SipServer
from telephony.sip.srtp import OFFER_SUITE, SUITES, Handover

log = get_logger("telephony.sip.resume")
RESUME_INVITE_TIMEOUT_S = 8.0  # a phone answers an in-dialog re-INVITE at once; no ringing is involved
# CSeq numbers our lost process may have used after the snapshot (REFER, BYE, INFO): the re-INVITE jumps
# past them, as RFC 3261 12.2.1.1 allows (a CSeq only has to grow)
CSEQ_MARGIN = 100


def restore(server: SipServer, snap: dict[str, Any]) -> SipCall:
    """The SipCall a snapshot describes (not yet registered, no media). ValueError when it is unreadable."""
    try:
        if snap.get("v") != SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {snap.get('v')!r}")
        invite = parse_message(str(snap["invite"]).encode())
        host, port = snap["peer"]
        # our address as this process sees it (the same host as a rule; a container may come back on another)
        call = SipCall(server, invite, Peer(str(snap["proto"]), (str(host), int(port))), str(snap["local_tag"]),
                       server.local_ip_toward(str(host)))
        call.remote_target = str(snap["remote_target"])
        call.remote_cseq = int(snap["remote_cseq"])
        call.local_cseq = int(snap["local_cseq"]) + CSEQ_MARGIN
        sdp = SdpSession(call.local_ip)
        sdp.sess_id, sdp.version = int(snap["sdp"][0]), int(snap["sdp"][1])
        call.sdp_session = sdp
    except (KeyError, TypeError, ValueError, SipParseError) as exc:
        raise ValueError(f"unreadable SIP dialog snapshot: {exc!r}"[:200]) from exc
    return call


def _terms(snap: dict[str, Any]) -> session_timer.Terms | None:
    """The session timer the lost process had agreed with the phone (None: none, or unreadable)."""
    raw = snap.get("timer")
    if (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], int) and raw[0] > 0
            and raw[1] in ("uac", "uas")):
        return session_timer.Terms(raw[0], raw[1])
    return None


def _srtp(call: SipCall, snap: dict[str, Any]) -> str | None:
    """An SRTP call goes on encrypted with the lost process's streams; the suite we offer (None: a plain call).
    An unreadable SRTP entry is offered SRTP under a new key (phones that re-key follow)."""
    raw = snap.get("srtp")
    if raw is None:
        return None
    try:
        handover = Handover.from_json(raw)
    except ValueError as exc:
        log.warning("sip_resume_srtp_unreadable", call_id=call.call_id, error=str(exc))
        suite = raw.get("suite") if isinstance(raw, dict) else None
        return suite if suite in SUITES else OFFER_SUITE
    call.media.continue_srtp(handover)
    return handover.suite


async def resume(server: SipServer, snap: dict[str, Any], leg: int,
                 timeout_s: float = RESUME_INVITE_TIMEOUT_S) -> tuple[SipCall | None, str]:
    """Re-INVITE the phone of a snapshotted call from this process. Returns (the call, "resumed"), handed to the
    server's on_call with `info.leg` = leg, or (None, why): "unreadable", "no_rtp_port", "no_answer" (timeout),
    "gone" (481/408: the phone hung up), "refused" (another final status), "bad_answer"."""
    call = _restored(server, snap)
    if call is None:
        return None, "unreadable"
    call.info.leg = leg
    try:
        await call.media.open(server.media_host(call.peer.addr[0]), server.settings.rtp_port_min,
                              server.settings.rtp_port_max)
    except OSError:
        return None, "no_rtp_port"
    rtp = snap.get("rtp")
    if isinstance(rtp, list) and len(rtp) == 4 and all(isinstance(v, (int, float)) for v in rtp):
        # the same RTP stream goes on, after a gap: the phone's jitter buffer sees loss, not a new stream
        call.media.continue_stream(int(rtp[0]), int(rtp[1]), int(rtp[2]), max(0.0, time.time() - float(rtp[3])))
    codec = str(snap.get("codec") or "PCMU")
    codecs = (codec,) + tuple(c for c in SUPPORTED if c != codec) if codec in SUPPORTED else SUPPORTED
    dtmf_pt = snap.get("dtmf_pt")
    suite = _srtp(call, snap)
    offer = call.sdp_offer(codecs, dtmf_pt=int(dtmf_pt) if isinstance(dtmf_pt, int) else 101, srtp_suite=suite)
    # in the table before the offer goes: a BYE the phone sends meanwhile finds its dialog
    call.state = "confirmed"
    server.calls[(call.call_id, call.local_tag)] = call
    terms = _terms(snap)
    timer = [("Session-Expires", terms.header()), ("Supported", "timer")] if terms else []
    resp, why = await _request(server, call, "INVITE", timeout_s, extra=[("Allow", ALLOW), *timer], body=offer,
                               content_type="application/sdp")
    if call.state == "terminated":  # the phone hung up (BYE) while we waited
        return None, "gone"
    if resp is None or why:
        call._finish(f"resume_{why}")
        return None, why
    try:
        neg = negotiate_answer(parse_sdp(resp.body))
    except SdpError:
        server.ack_2xx(call, resp)
        await call.hangup("error:bad_answer")
        return None, "bad_answer"
    contact = resp.get("Contact")
    if contact:
        call.remote_target = addr_uri(contact)
    call.media.apply(neg)
    server.ack_2xx(call, resp)
    call.acked.set()
    call.confirm()
    if terms is not None:  # our re-INVITE refreshed the session: its clock starts here (the phone may amend it)
        try:
            call.session_refreshed(session_timer.requested(resp, default_refresher=terms.refresher) or terms)
        except session_timer.IntervalTooSmall:
            call.session_refreshed(terms)
    call.log.info("sip_call_resumed", leg=leg, codec=neg.codec, remote=f"{neg.remote_ip}:{neg.remote_port}",
                  local_port=call.media.local_port)
    server.media_up(call)
    return call, "resumed"


async def hang_up(server: SipServer, snap: dict[str, Any], timeout_s: float = RESUME_INVITE_TIMEOUT_S) -> str:
    """End a snapshotted call's dialog from this process with a BYE: a call the bot was hanging up when its process
    died, or one lost too long ago to carry on, must not leave the phone in silence. Returns "hung_up", "gone"
    (481/408: the phone had ended it), "no_answer", "refused" or "unreadable"."""
    call = _restored(server, snap)
    if call is None:
        return "unreadable"
    call.state = "confirmed"
    _resp, why = await _request(server, call, "BYE", timeout_s)
    return why or "hung_up"


def _restored(server: SipServer, snap: dict[str, Any]) -> SipCall | None:
    try:
        return restore(server, snap)
    except ValueError as exc:
        log.warning("sip_resume_unreadable", error=str(exc))
        return None


async def _request(server: SipServer, call: SipCall, method: str, timeout_s: float,
                   **kw: Any) -> tuple[SipMessage | None, str]:
    """Send an in-dialog request; (its final response, "") on a 2xx, else (it or None, why): "no_answer" (none in
    time), "gone" (408/481: the phone no longer has the dialog) or "refused" (any other failure)."""
    try:
        resp = await asyncio.wait_for(server.send_in_dialog(call, method, **kw), timeout_s)
    except asyncio.TimeoutError:
        resp = None
    if resp is None:
        return None, "no_answer"
    if resp.status < 300:
        return resp, ""
    return resp, "gone" if resp.status in (408, 481) else "refused"
