"""A SIP call as a telephony.bridge.CallBridge: dialog state (RFC 3261 section 12) + its RTP session.

The server owns transports and transactions; a SipCall owns what belongs to one dialog: tags,
CSeq counters, remote target and route set, the media session, the inbound event queue, and the
outbound requests it starts (BYE, REFER).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import numpy as np

from ops.logs import get_logger
from ops.metrics import AUDIO_JITTER, AUDIO_LOSS, ERRORS, TRANSFERS
from telephony.bridge import AudioIn, CallBridge, CallEnded, CallInfo, DtmfIn, InboundEvent, until_ended
from telephony.sip import session_timer
from telephony.sip.media import RtpSession
from telephony.sip.message import SipMessage, addr_uri, hostport
from telephony.sip.sdp import SUPPORTED, Negotiated, SessionDesc
from telephony.sip.srtp import OFFER_SUITE, Crypto

if TYPE_CHECKING:
    from telephony.sip.server import Peer, SipServer


TRANSFER_BYE_DELAY_S = 0.5
# The conversation gives transfer() 10 s (bot/conversation.py) and cancels it after that: every REFER,
# the fallback's included, must be over (and counted, and reported) inside this budget. Otherwise the
# conversation gives up mid-fallback: it apologises "I couldn't transfer you" while the caller's phone is
# still following the REFER, the call is recorded as transfer_failed and that attempt is never counted.
TRANSFER_BUDGET_S = 9.0
MIN_ATTEMPT_S = 1.0  # a fallback REFER with less time than this left is not started
MAX_QUEUED_EVENTS = 1500  # 30 s of 20 ms frames
# Some phones send every key both as RFC 4733 telephone-events and as SIP INFO. Signalling and media take
# different paths, so either copy can come first: an INFO digit followed by the same RFC 4733 digit within
# this window is one key press. Once a call has sent RFC 4733 events, they are the source of truth and
# INFO digits are dropped as duplicates (counted: voicebot_errors_total{component="sip",kind="dtmf_duplicate"}).
DTMF_DUPLICATE_WINDOW_S = 1.0
MIN_QUALITY_PACKETS = 250  # 5 s of caller audio before a call's loss and jitter go into the fleet's histograms
SNAPSHOT_VERSION = 1  # resume_state()'s layout (telephony/sip/resume.py reads it)
MAX_SNAPSHOT_INVITE_BYTES = 16 * 1024  # a larger INVITE is not kept: that call is simply not resumable


class SipCall(CallBridge):
    def __init__(self, server: SipServer, invite: SipMessage, peer: Peer, local_tag: str, local_ip: str) -> None:
        self.server = server
        self.invite = invite
        self.peer = peer
        self.local_tag = local_tag
        self.local_ip = local_ip
        self.call_id = invite.call_id
        self.remote_tag = invite.from_tag
        self.local_uri = f"{invite.get('To')};tag={local_tag}"  # our From in requests we send
        self.remote_uri = invite.get("From")
        contact = invite.get("Contact")
        self.remote_target = addr_uri(contact) if contact else addr_uri(invite.get("From"))
        self.route_set = invite.get_all("Record-Route")
        self.remote_cseq = invite.cseq[0]
        self.local_cseq = 1
        self.state = "early"  # early -> confirmed -> terminated
        self.end_reason = ""
        self.log = get_logger("telephony.sip.call", call_id=self.call_id)
        self._events: asyncio.Queue[InboundEvent] = asyncio.Queue()
        self.media = RtpSession(self.call_id, self._emit, self._on_rtp_timeout,
                                jitter_target=server.settings.jitter_target_frames,
                                rtp_timeout_s=server.settings.rtp_timeout_s)
        self.info = CallInfo(call_id=self.call_id, transport="sip", caller=_user(self.remote_uri),
                             called=_user(invite.get("To")),
                             params={"source_ip": peer.addr[0], "user_agent": invite.get("User-Agent")[:80]})
        self._refer: asyncio.Future[int] | None = None
        self.acked = asyncio.Event()
        self.ended = asyncio.Event()
        self.started_at = time.monotonic()
        self.sdp_session: Any = None
        self.handler_task: asyncio.Task[None] | None = None
        self.dtmf_info_digits = 0
        self.dtmf_rfc4733_seen = False
        self.dtmf_duplicates = 0
        self._info_unmatched: deque[tuple[str, float]] = deque(maxlen=8)  # INFO digits no RTP event matched yet
        self.awaiting_answer = False  # we offered (late offer / offerless re-INVITE); the ACK answers
        # RFC 3262: the (RSeq, INVITE CSeq) of the reliable 180 we sent, and its PRACK's arrival
        self.reliable_provisional: tuple[int, int] | None = None
        self.prack_received = asyncio.Event()
        # The ACK of the initial INVITE has arrived. Until then the caller may never have received our 200
        # (Timer H ends the call as error:no_ack after 32 s): their silence is not "no input" and the
        # missing RTP is not an RTP timeout, or a failed setup would be recorded as a caller who went quiet.
        self.established = False
        self.media.timeout_armed = False
        # told the new resume_state() when the dialog changes (a re-INVITE from the phone): the copy kept for a
        # process that takes the call over must stay current (bot/sip_recovery.py)
        self.on_dialog_change: Callable[[dict[str, Any]], None] | None = None
        # RFC 4028 session timer agreed with the phone (None: none); its clock restarts on every refresh
        self.session_terms: session_timer.Terms | None = None
        self._session_clock: asyncio.Task[None] | None = None

    # CallBridge ----------------------------------------------------------------------------------
    def events(self) -> AsyncIterator[InboundEvent]:
        return until_ended(self._events)

    async def send_audio(self, pcm: np.ndarray) -> None:
        if self.state != "terminated":
            self.media.queue_audio(pcm)

    async def mark(self, name: str) -> None:
        self.media.queue_mark(name)

    async def clear(self) -> None:
        self.media.clear()

    async def hangup(self, reason: str = "completed") -> None:
        if self.state == "terminated":
            return
        self._finish(reason)
        await self.server.send_in_dialog(self, "BYE")

    @property
    def on_hold(self) -> bool:
        if not self.established:  # answered but not ACKed: nothing says the caller hears us yet
            return True
        neg = self.media.neg
        return neg is not None and (neg.direction in ("recvonly", "inactive") or self.media.remote is None)

    async def transfer(self, target: str, context: dict[str, Any]) -> bool:
        """REFER the caller to the queue's URI (RFC 3515); on failure try BOT_SIP_TRANSFER_FALLBACK."""
        settings = self.server.settings
        uri = resolve_target(target, settings.queue_uris, settings.transfer_fallback)
        if not uri:
            # Nowhere to send the caller: say so where on-call looks, as the Twilio bridge does.
            self.log.warning("transfer_unconfigured", queue=target,
                             hint="set BOT_SIP_QUEUE_URIS or BOT_SIP_TRANSFER_FALLBACK")
            TRANSFERS.labels("sip", target, "unconfigured").inc()
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TRANSFER_BUDGET_S
        tried: list[str] = []
        for candidate in [uri, settings.transfer_fallback]:
            if not candidate or candidate in tried or self.state == "terminated":
                continue
            left = deadline - loop.time()
            if tried and left < MIN_ATTEMPT_S:
                self.log.warning("transfer_fallback_skipped", queue=target, fallback=candidate,
                                 left_s=round(left, 2), budget_s=TRANSFER_BUDGET_S)
                break
            tried.append(candidate)
            ok = await self._refer_once(candidate, target, left)
            if not ok and self.state == "terminated":
                # The caller hung up (or the call was torn down) while the REFER was in flight: not a failed
                # transfer to alert on, and no fallback to try on a call that is gone.
                self.log.info("transfer_abandoned", queue=target, reason=self.end_reason)
                TRANSFERS.labels("sip", target, "caller_hangup").inc()
                return False
            TRANSFERS.labels("sip", target, "ok" if ok else "failed").inc()
            if ok:
                # Leave the call a moment *after* reporting success, so the conversation records the
                # transfer before it sees CallEnded (RFC 3515: the transferor BYEs after NOTIFY 200).
                asyncio.get_running_loop().call_later(TRANSFER_BYE_DELAY_S, self._bye_after_transfer)
                return True
        return False

    def _bye_after_transfer(self) -> None:
        if self.state != "terminated":
            self.server._spawn(self.hangup("transferred"))

    async def _refer_once(self, uri: str, queue: str, budget_s: float) -> bool:
        """One REFER: True when the final NOTIFY says 2xx, all within budget_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget_s
        self._refer = loop.create_future()
        referred_by = f"<sip:bot@{hostport(self.local_ip, self.server.port)}>"
        try:
            try:
                resp = await asyncio.wait_for(self.server.send_in_dialog(
                    self, "REFER", [("Refer-To", f"<{uri}>"), ("Referred-By", referred_by)]), budget_s)
            except asyncio.TimeoutError:
                resp = None
            if resp is None or not 200 <= resp.status < 300:
                self.log.warning("refer_rejected", status=resp.status if resp else None, queue=queue, uri=uri)
                ERRORS.labels("sip", "refer_rejected").inc()
                return False
            wait_s = max(0.0, min(self.server.settings.transfer_timeout_s, deadline - loop.time()))
            try:
                status = await asyncio.wait_for(asyncio.shield(self._refer), wait_s)
            except asyncio.TimeoutError:
                self.log.warning("refer_timeout", queue=queue, uri=uri, waited_s=round(wait_s, 2))
                ERRORS.labels("sip", "refer_timeout").inc()
                return False
        finally:
            self._refer = None
        self.log.info("refer_result", status=status, queue=queue)
        return 200 <= status < 300

    def on_notify(self, msg: SipMessage) -> None:
        """NOTIFY for our REFER: the body is a sipfrag status line (RFC 3515 2.4.5)."""
        line = msg.body.decode("utf-8", errors="replace").strip().splitlines()[:1]
        parts = line[0].split() if line else []
        code = int(parts[1]) if len(parts) >= 2 and parts[0] == "SIP/2.0" and parts[1].isdigit() else 0
        terminated = msg.get("Subscription-State").lower().startswith("terminated")
        if self._refer is not None and not self._refer.done():
            if code >= 200:
                self._refer.set_result(code)
            elif terminated:
                self._refer.set_result(code or 487)

    # Carrying the call on elsewhere ---------------------------------------------------------------
    def resume_state(self) -> dict[str, Any] | None:
        """Our half of the dialog, for another process to re-INVITE the phone from if this one dies
        (telephony/sip/resume.py). None when the call cannot be carried on (not set up, an oversized INVITE)."""
        if self.state != "confirmed" or self.sdp_session is None or self.media.neg is None:
            return None
        # the headers make the dialog; its SDP is not needed and may hold the phone's SRTP key, which stays here
        raw = dataclasses.replace(self.invite, body=b"").encode()
        if len(raw) > MAX_SNAPSHOT_INVITE_BYTES:
            return None
        neg = self.media.neg
        return {
            "v": SNAPSHOT_VERSION, "invite": raw.decode("utf-8", errors="replace"), "local_tag": self.local_tag,
            "local_ip": self.local_ip, "host_ip": self.server.host_ip_toward(self.peer.addr[0]),
            "sip_port": self.server.port, "proto": self.peer.proto,
            "peer": [self.peer.addr[0], self.peer.addr[1]],
            "remote_target": self.remote_target, "local_cseq": self.local_cseq, "remote_cseq": self.remote_cseq,
            "sdp": [self.sdp_session.sess_id, self.sdp_session.version], "codec": neg.codec,
            "dtmf_pt": neg.dtmf_pt, "rtp": [*self.media.outbound_position(), round(time.time(), 3)],
            **self._srtp_snapshot(),
            **({"timer": [self.session_terms.interval_s, self.session_terms.refresher]} if self.session_terms else {}),
        }

    def _srtp_snapshot(self) -> dict[str, Any]:
        """An SRTP call's streams (telephony/sip/srtp.py Handover): the process carrying the call on goes on with them
        (not every phone takes a new key in a re-INVITE). Our key is written down; the phone's key is not."""
        h = self.media.srtp_handover()
        return {"srtp": h.to_json()} if h is not None else {}

    # SDP -----------------------------------------------------------------------------------------------
    def sdp_answer(self, offer: SessionDesc, neg: Negotiated, idx: int) -> bytes:
        """Our answer to an offer already applied to the media (with our SRTP key when the stream is SRTP)."""
        key = self.media.local_key(neg.crypto.suite) if neg.crypto is not None else None
        return self.sdp_session.answer(offer, neg, idx, self.media.local_port, key)

    def sdp_offer(self, codecs: tuple[str, ...] = SUPPORTED, dtmf_pt: int = 101, srtp_suite: str | None = None) -> bytes:
        """Our offer (late offer, offerless re-INVITE, session refresh, takeover): SRTP when the call already is
        (same suite, same key: the contexts go on), when `srtp_suite` says so, or when BOT_SIP_SRTP=required."""
        suite = srtp_suite or (self.media.srtp.suite if self.media.srtp is not None else None)
        if suite is None and self.server.settings.srtp == "required":
            suite = OFFER_SUITE
        crypto = Crypto(1, suite, self.media.local_key(suite)) if suite else None
        return self.sdp_session.offer(self.media.local_port, codecs, dtmf_pt=dtmf_pt, crypto=crypto)

    def dialog_changed(self) -> None:
        """The dialog changed (a re-INVITE from the phone): the kept copy is brought up to date."""
        if self.on_dialog_change is not None and (state := self.resume_state()) is not None:
            try:
                self.on_dialog_change(state)
            except Exception as exc:  # noqa: BLE001 - bookkeeping must never break the call's signalling
                self.log.warning("dialog_change_hook_failed", error=repr(exc)[:200])

    # Lifecycle ------------------------------------------------------------------------------------
    def confirm(self) -> None:
        """The initial INVITE's ACK arrived: the call is set up; the RTP timeout counts from now."""
        if self.established:
            return
        self.established = True
        self.media.last_rx = time.monotonic()
        self.media.timeout_armed = True

    def info_digit(self, digit: str) -> bool:
        """A digit from SIP INFO; False (and counted) when it duplicates the RFC 4733 stream."""
        now = time.monotonic()
        self.dtmf_info_digits += 1
        if self.dtmf_rfc4733_seen:
            self._dtmf_duplicate("info")
            return False
        self._info_unmatched.append((digit, now))
        self._events.put_nowait(DtmfIn(digit, now))
        return True

    def _rfc4733_digit(self, ev: DtmfIn) -> None:
        self.dtmf_rfc4733_seen = True
        for i, (digit, t) in enumerate(self._info_unmatched):
            if digit == ev.digit and ev.t - t <= DTMF_DUPLICATE_WINDOW_S:  # its INFO copy came first
                del self._info_unmatched[i]
                self._dtmf_duplicate("rfc4733")
                return
        self._info_unmatched.clear()  # from now on INFO digits are dropped, nothing left to match
        self._events.put_nowait(ev)

    def _dtmf_duplicate(self, dropped: str) -> None:
        self.dtmf_duplicates += 1
        ERRORS.labels("sip", "dtmf_duplicate").inc()
        if self.dtmf_duplicates == 1:  # once per call: the phone does this for every key
            self.log.info("dtmf_duplicate", dropped=dropped,
                          hint="the phone sends each key as RFC 4733 and SIP INFO; one copy is ignored")

    def _emit(self, ev: InboundEvent) -> None:
        """Queue an inbound event; a consumer that stopped reading loses audio, never memory or DTMF."""
        if isinstance(ev, DtmfIn):
            self._rfc4733_digit(ev)
            return
        if isinstance(ev, AudioIn) and self._events.qsize() >= MAX_QUEUED_EVENTS:
            ERRORS.labels("sip", "event_overflow").inc()
            return
        self._events.put_nowait(ev)

    def _on_rtp_timeout(self) -> None:
        self.log.warning("rtp_timeout", timeout_s=self.media.rtp_timeout_s)
        ERRORS.labels("rtp", "timeout").inc()
        asyncio.get_running_loop().create_task(self.hangup("rtp_timeout"))

    def session_refreshed(self, terms: session_timer.Terms | None) -> None:
        """The session was set up or refreshed (a 2xx to an INVITE, re-INVITE or UPDATE) under `terms` (None: no
        session timer from now on): the clock starts again."""
        if self._session_clock is not None and self._session_clock is not asyncio.current_task():
            self._session_clock.cancel()
        self._session_clock = None
        self.session_terms = terms
        if terms is not None and self.state != "terminated":
            self._session_clock = asyncio.get_running_loop().create_task(self._run_session_clock(terms))

    async def _run_session_clock(self, terms: session_timer.Terms) -> None:
        """The refresher's side: refresh at half the interval. The other side's: end the call when no refresh
        came in time (the phone, or a proxy on the way, has lost the session: it would tear the call down too)."""
        if terms.refresher == "uas":
            await asyncio.sleep(terms.refresh_after_s())
            if self.state == "terminated":
                return
            if await self.server.refresh_session(self):
                self.log.debug("sip_session_refreshed", interval_s=terms.interval_s)
                return
            why = "refresh_refused"
        else:
            await asyncio.sleep(terms.expire_after_s())
            why = "no_refresh"
        if self.state == "terminated":
            return
        ERRORS.labels("sip", "session_expired").inc()
        self.log.warning("sip_session_expired", interval_s=terms.interval_s, refresher=terms.refresher, why=why)
        self._session_clock = None  # hangup -> _finish must not cancel the task running it
        await self.hangup("session_expired")

    def _finish(self, reason: str) -> None:
        """Terminate locally (idempotent): stop media, end the event stream, leave the server tables."""
        if self.state == "terminated":
            return
        self.state = "terminated"
        if self._session_clock is not None and self._session_clock is not asyncio.current_task():
            self._session_clock.cancel()
        self.end_reason = reason
        self.server.clock.discard(self.media)
        self.media.close()
        self._events.put_nowait(CallEnded(reason, time.monotonic()))
        self.ended.set()
        if self._refer is not None and not self._refer.done():
            self._refer.set_result(487)
        self.server.forget(self)
        quality = self.media.quality()
        self.log.info("call_ended", reason=reason, duration_s=round(time.monotonic() - self.started_at, 2),
                      rx=self.media.stats["rx"], tx=self.media.stats["tx"], rx_bad=self.media.stats["rx_bad"],
                      **(quality or {}))
        if quality is not None and self.media.reception.expected >= MIN_QUALITY_PACKETS:
            AUDIO_LOSS.labels("in").observe(quality["rx_loss_pct"] / 100)
            AUDIO_JITTER.labels("in").observe(quality["rx_jitter_ms"] / 1000)
            if "peer_loss_pct" in quality:
                AUDIO_LOSS.labels("out").observe(quality["peer_loss_pct"] / 100)
                AUDIO_JITTER.labels("out").observe(quality["peer_jitter_ms"] / 1000)

    def media_quality(self) -> dict[str, float | int] | None:
        return self.media.quality()


def _user(value: str) -> str:
    uri = addr_uri(value)
    user = uri.split(":", 1)[-1].split("@")[0] if "@" in uri else ""
    return user


def resolve_target(target: str, queues: dict[str, str], fallback: str) -> str:
    """Queue name -> configured URI; sip:/sips:/tel: URIs pass through; unknown names -> fallback."""
    if target.lower().startswith(("sip:", "sips:", "tel:")):
        return target
    return queues.get(target, fallback)

