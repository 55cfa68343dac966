"""Live view and today's rates, read from the call records and event streams in Redis (bot/state.py),
so every worker's calls are counted no matter which worker serves the console.

Rates for calls started today (UTC):
  automation    = ended calls handled without a human / ended calls
  escalation    = ended calls transferred (or handed) to a human / ended calls
  clarification = caller turns answered with confirm / clarify / reprompt / dtmf_menu / all decided turns
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from typing import Any

import redis.asyncio as aioredis

from bot.state import RECENT, call_key, events_key

CLARIFY_ACTIONS = {"confirm", "clarify", "reprompt", "dtmf_menu"}
MAX_CALLS_SCANNED = 5000

# Ended calls never change again: their per-call summary is cached per worker process.
_summary_cache: dict[str, dict[str, Any]] = {}


async def live_calls(call_store: Any) -> list[dict[str, Any]]:
    calls = await call_store.live_calls()
    if not calls:
        return []
    r: aioredis.Redis = call_store.r
    pipe = r.pipeline(transaction=False)
    for c in calls:
        pipe.hmget(call_key(c["call_id"]), "policy_version", "status", "caller_masked", "transport", "started_at")
        pipe.xlen(events_key(c["call_id"]))
    res = await pipe.execute()
    now = time.time()
    out = []
    for i, c in enumerate(calls):
        pv, status, masked, transport, started = (_s(x) for x in res[2 * i])
        started_at = float(started or c.get("started_at") or now)
        out.append({
            "call_id": c["call_id"],
            "worker": c.get("worker", ""),
            "transport": transport or c.get("transport", ""),
            "caller": masked or c.get("caller_masked", ""),
            "policy_version": pv,
            "status": status or "active",
            "started_at": started_at,
            "duration_s": round(max(0.0, now - started_at), 1),
            "events": int(res[2 * i + 1] or 0),
        })
    return sorted(out, key=lambda c: c["started_at"], reverse=True)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))


def _summarize(record: dict[str, str], events: list[tuple[str, dict[str, str]]]) -> dict[str, Any]:
    """Per call: decided turns, clarifying turns, and whether the bot handed the caller over."""
    turns = clar = 0
    transferred = False
    for _id, f in events:
        etype = _s(f.get("type"))
        if etype not in ("turn", "dtmf_turn", "transfer"):
            continue
        try:
            data = json.loads(_s(f.get("data")) or "{}")
        except ValueError:
            continue
        if etype == "transfer":
            transferred = True  # attempted or done: either way the bot could not finish the call
            continue
        action = (data.get("decision") or {}).get("action", "")
        turns += 1
        if action in CLARIFY_ACTIONS:
            clar += 1
        elif action == "transfer":
            transferred = True
    if _s(record.get("outcome")).startswith("transfer"):
        transferred = True
    return {"ended": _s(record.get("status")) == "ended", "transferred": transferred, "turns": turns, "clarifications": clar}


def _summarize_all(ids: list[str], res: list[Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for i, cid in enumerate(ids):
        rec = {_s(k): _s(v) for k, v in (res[2 * i] or {}).items()}
        if rec:
            out[cid] = _summarize(rec, res[2 * i + 1] or [])
    return out


def day_start(now: float | None = None) -> float:
    d = dt.datetime.fromtimestamp(now or time.time(), dt.timezone.utc)
    return d.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


async def today_stats(r: aioredis.Redis, now: float | None = None) -> dict[str, Any]:
    since = day_start(now)
    ids = [_s(x) for x in await r.zrangebyscore(RECENT, since, "+inf", start=0, num=MAX_CALLS_SCANNED)]
    fresh: dict[str, dict[str, Any]] = {}
    todo = [cid for cid in ids if cid not in _summary_cache]
    if todo:
        pipe = r.pipeline(transaction=False)
        for cid in todo:
            pipe.hgetall(call_key(cid))
            pipe.xrange(events_key(cid))
        res = await pipe.execute()
        # Parsing thousands of events is CPU work: off the event loop.
        fresh = await asyncio.get_running_loop().run_in_executor(None, _summarize_all, todo, res)
        for cid, s in fresh.items():
            if s["ended"]:
                _summary_cache[cid] = s
    summaries = [fresh.get(cid) or _summary_cache[cid] for cid in ids if cid in fresh or cid in _summary_cache]
    ended = [s for s in summaries if s["ended"]]
    escalated = sum(1 for s in ended if s["transferred"])
    turns = sum(s["turns"] for s in summaries)
    clar = sum(s["clarifications"] for s in summaries)

    def rate(a: int, b: int) -> float | None:
        return round(a / b, 4) if b else None

    if len(_summary_cache) > 50_000:  # bound memory on long-lived workers
        _summary_cache.clear()
    return {
        "since": since,
        "calls": len(summaries),
        "ended": len(ended),
        "in_progress": len(summaries) - len(ended),
        "turns": turns,
        "automation_rate": rate(len(ended) - escalated, len(ended)),
        "escalation_rate": rate(escalated, len(ended)),
        "clarification_rate": rate(clar, turns),
    }
