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

A host that does not come back, or comes back under another worker id (a replaced container), would leave its
phones in silence: so every worker with a SIP server also runs `adopt_forever`. A worker whose heartbeat (the
`workers` zset) has been silent for BOT_SIP_TAKEOVER_AFTER_S and which still lists SIP calls is first asked over SIP
who it is (telephony/sip/probe.py: a worker cut off from Redis but still serving its phones answers as itself and
keeps them); otherwise its calls are taken exactly as above, from this process's address: the re-INVITE's Contact
and SDP move the phone's signalling and audio here. A claim (ZREM) makes each call taken once, whoever tries.

Counted in voicebot_sip_resumes_total{result}; a call not carried on gets `sip_takeover {result}` in its story
(a resumed one `call_resumed`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

from bot.reaper import close_lost_leg, redis_time
from bot.state import WORKERS, CallStore, as_str, call_key, decode_hash, finite_float, resumable_key
from ops import metrics
from ops.logs import get_logger

log = get_logger("bot.sip_recovery")
RESUME_TIMEOUT_S = 20.0  # the whole pass (reads, closes, every re-INVITE in parallel)
ADOPT_EVERY_S = 5.0  # how often a SIP worker looks for other workers' orphaned SIP calls (one heartbeat)
WARN_EVERY_S = 60.0  # a worker cut off from Redis but still serving its phones is logged once a minute, not per pass
_warned: dict[str, float] = {}  # worker id -> when (Redis's clock) that was last logged


async def resume_lost_calls(store: CallStore, server: Any, window_s: float, ttl_s: int | None = None) -> dict[str, str]:
    """Carry on this worker id's SIP calls that its previous process lost. Returns {call_id: result}."""
    return await _take_over(store, server, store.worker, window_s, ttl_s, f"{store.worker}-sip-resume")


async def adopt_orphaned_calls(store: CallStore, server: Any, window_s: float, after_s: float,
                               ttl_s: int | None = None,
                               probe: Callable[[str, int], Awaitable[str | None]] | None = None) -> dict[str, str]:
    """Carry on the SIP calls of other workers that have been silent in Redis for `after_s` (no heartbeat: the
    host died, or came back under another worker id) and whose SIP address does not answer as themselves.
    Returns {call_id: result}."""
    from telephony.sip.probe import who_answers

    r = store.r
    if not store.settled():
        return {}  # our own view of the heartbeats is not to be trusted yet
    now = await redis_time(r)
    results: dict[str, str] = {}
    for raw, beat in await r.zrange(WORKERS, 0, -1, withscores=True):
        worker = as_str(raw)
        if worker == store.worker or now - float(beat) < after_s or not await r.zcard(resumable_key(worker)):
            continue
        if (at := await _answering_at(worker, await _sip_addresses(r, worker), probe or who_answers)) is not None:
            # alive and serving its phones, only cut off from Redis: a second re-INVITE would put two bots on the
            # line. Its calls stay its own
            if now - _warned.get(worker, 0.0) >= WARN_EVERY_S:
                _warned[worker] = now
                log.warning("sip_worker_silent_but_answering", worker=worker, silent_s=round(now - float(beat), 1),
                            sip=f"{at[0]}:{at[1]}")
            continue
        got = await _take_over(store, server, worker, window_s, ttl_s, f"{store.worker}-sip-adopt")
        if got:
            log.warning("sip_calls_adopted", from_worker=worker, silent_s=round(now - float(beat), 1),
                        resumed=sum(v == "resumed" for v in got.values()), tried=len(got))
        results.update(got)
    return results


async def adopt_forever(store: CallStore, server: Any, window_s: float, after_s: float, ttl_s: int | None = None,
                        every_s: float = ADOPT_EVERY_S) -> None:
    """adopt_orphaned_calls every `every_s` while this SIP server takes calls (a draining worker takes no more)."""
    while True:
        await asyncio.sleep(every_s)
        if not server.accepting:
            return
        try:
            await asyncio.wait_for(adopt_orphaned_calls(store, server, window_s, after_s, ttl_s), RESUME_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis down or slow: the next pass tries again
            metrics.ERRORS.labels("sip", "adopt_failed").inc()
            log.warning("sip_adopt_failed", error=repr(exc)[:200])


async def _sip_addresses(r: Any, worker: str) -> list[tuple[str, int]]:
    """Where a worker's SIP server listens, from the dialog kept for one of its calls: the address it advertised
    (BOT_SIP_PUBLIC_IP behind a NAT) and its host's own (a peer on the same network may not reach the public one
    through the NAT). Empty: not recorded."""
    for raw in await r.zrange(resumable_key(worker), 0, 4):
        try:
            snap = json.loads(as_str(await r.hget(call_key(as_str(raw)), "sip_dialog") or ""))
            port = int(snap["sip_port"])
            ips = [str(ip) for ip in (snap.get("host_ip"), snap["local_ip"]) if ip]
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        return [(ip, port) for ip in dict.fromkeys(ips)]
    return []


async def _answering_at(worker: str, addrs: list[tuple[str, int]],
                        probe: Callable[[str, int], Awaitable[str | None]]) -> tuple[str, int] | None:
    """The first of `addrs` where `worker`'s SIP server still answers as itself (None: at none)."""
    for addr in addrs:
        if await probe(*addr) == worker:
            return addr
    return None


async def _take_over(store: CallStore, server: Any, worker: str, window_s: float, ttl_s: int | None,
                     reaper: str) -> dict[str, str]:
    """Re-INVITE (or BYE) the calls listed under `worker` whose process is gone, from this process."""
    from telephony.sip.resume import hang_up, resume

    r = store.r
    key = resumable_key(worker)
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
            continue  # another process took it
        action = await _check(r, cid, rec, now, window_s, reaper, ttl_s)
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
        store.late_event(cid, "sip_takeover", result=result, worker=worker)
        log.info("sip_call_not_resumed", call_id=cid, result=result, from_worker=worker)
    if results:
        log.info("sip_calls_taken_over", from_worker=worker, resumed=sum(v == "resumed" for v in results.values()),
                 tried=len(results))
    return results


async def _check(r: Any, cid: str, rec: dict[str, str], now: float, window_s: float, reaper: str,
                 ttl_s: int | None) -> str:
    """"resume" (re-INVITE the phone), "bye" (end its dialog: the bot was hanging up, or it was lost too long
    ago to carry on), or why nothing is done."""
    if not rec or not rec.get("sip_dialog"):
        return "expired"
    if rec.get("status") == "active":
        # its process is gone (we are the only process of its worker id, or that worker has been silent and does
        # not answer SIP) and nobody has closed it yet: close the lost leg as a reaper would, then carry it on
        if not await close_lost_leg(r, cid, reaper, ttl_s):
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
