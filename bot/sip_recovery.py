"""SIP calls of a worker that died come back when its replacement starts.

A Twilio call whose worker died comes back by itself (Twilio asks `<Connect action>` what next). A SIP phone
does not ask: its dialog simply goes quiet. So every SIP call keeps its dialog in its record (`sip_dialog`,
CallStore.keep_resumable) and is listed under its worker id (`calls:resumable:<worker>`). When worker 0, which
holds the SIP port, is restarted under the same id (bot serve's supervisor does it at once), its SIP server
starts listening and then `resume_lost_calls` takes each listed call whose worker died (outcome `worker_lost`,
or still `active` under another process: it is closed `worker_lost` first, as the Twilio path does) within
BOT_SIP_RESUME_WINDOW_S, and re-INVITEs the phone from this process (telephony/sip/resume.py). A call the bot
was hanging up when its process died, or one lost longer ago than the window, gets a BYE instead: no phone is
left on a silent line. The phone's
audio moves to the new RTP port and the conversation carries on from the record as leg N+1 ("Sorry, we were cut
off. ..." and the unanswered question), exactly as a Twilio call back on a new stream.

Counted in voicebot_sip_resumes_total{result}; a call not carried on gets `sip_takeover {result}` in its story
(a resumed one `call_resumed`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from bot.reaper import close_lost_leg, redis_time
from bot.state import CallStore, as_str, call_key, decode_hash, finite_float, resumable_key
from ops import metrics
from ops.logs import get_logger

log = get_logger("bot.sip_recovery")
RESUME_TIMEOUT_S = 20.0  # the whole pass (reads, closes, every re-INVITE in parallel)


async def resume_lost_calls(store: CallStore, server: Any, window_s: float, ttl_s: int | None = None) -> dict[str, str]:
    """Carry on this worker id's SIP calls that its previous process lost. Returns {call_id: result}."""
    from telephony.sip.resume import hang_up, resume

    r = store.r
    key = resumable_key(store.worker)
    me = str(store.pid)
    now = await redis_time(r)
    results: dict[str, str] = {}
    todo: list[tuple[str, dict[str, Any], int]] = []  # leg 0: end the dialog with a BYE instead
    for raw in await r.zrange(key, 0, -1):
        cid = as_str(raw)
        rec = decode_hash(await r.hgetall(call_key(cid)))
        if rec.get("worker_pid") == me:
            continue  # a call of this process (listed since it started): nothing was lost
        if not await r.zrem(key, cid):
            continue  # another process of this id took it
        action = await _check(r, cid, rec, now, window_s, store.worker, ttl_s)
        if action not in ("resume", "bye"):
            results[cid] = action
            continue
        try:
            snap = json.loads(rec["sip_dialog"])
        except (KeyError, ValueError):
            results[cid] = "unreadable"
            continue
        todo.append((cid, snap, int(finite_float(rec.get("leg")) or 1) + 1 if action == "resume" else 0))

    async def one(cid: str, snap: dict[str, Any], leg: int) -> None:
        try:
            if leg:
                _call, results[cid] = await resume(server, snap, leg)
            else:
                results[cid] = await hang_up(server, snap)
        except Exception as exc:  # noqa: BLE001 - one call's failure must not stop the others
            log.error("sip_takeover_failed", call_id=cid, error=repr(exc)[:200])
            results[cid] = "error"

    await asyncio.gather(*(one(*t) for t in todo))
    for cid, result in results.items():
        metrics.SIP_RESUMES.labels(result).inc()
        if result == "resumed":
            continue  # the conversation's call_resumed tells it
        store.late_event(cid, "sip_takeover", result=result)
        log.info("sip_call_not_resumed", call_id=cid, result=result)
    if results:
        log.info("sip_calls_taken_over", resumed=sum(v == "resumed" for v in results.values()), tried=len(results))
    return results


async def _check(r: Any, cid: str, rec: dict[str, str], now: float, window_s: float, worker: str,
                 ttl_s: int | None) -> str:
    """"resume" (re-INVITE the phone), "bye" (end its dialog: the bot was hanging up, or it was lost too long
    ago to carry on), or why nothing is done."""
    if not rec or not rec.get("sip_dialog"):
        return "expired"
    if rec.get("status") == "active":
        # its process is gone (we are the only process of this worker id) and nobody has closed it yet: close the
        # lost leg as a reaper would, then carry the call on
        if not await close_lost_leg(r, cid, f"{worker}-sip-resume", ttl_s):
            return "ended"
        rec = decode_hash(await r.hgetall(call_key(cid)))
    if rec.get("outcome") != "worker_lost":
        return "ended"  # the call ended normally (its BYE was sent); its end just did not remove it from the list
    if rec.get("ending"):
        return "bye"  # the bot was saying goodbye / hanging up when its process died: finish that
    lost_at = finite_float(rec.get("ended_at"))
    if lost_at is None or now - lost_at > window_s:
        return "bye"  # too late to carry on (the caller has most likely given up): do not leave the line open
    return "resume"
