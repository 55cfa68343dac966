"""`bot calls`, `bot calls show CALL_ID [--json]` and `bot calls live`: call records and events from Redis."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import datetime, timezone
from typing import Any

from bot.commands import int_between
from ops.logs import mask_digits


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("calls", help="inspect calls stored in Redis (alone: the most recent calls)")
    p.add_argument("--redis-url", default=None,
                   help="default: REDIS_URL, else the embedded Redis of a bot running under BOT_DATA_DIR")
    p.add_argument("-n", "--limit", type=int_between(1), default=20, help="how many recent calls to list (default 20)")
    p.set_defaults(func=run_list)
    csub = p.add_subparsers(dest="calls_cmd")
    show = csub.add_parser("show", help="a call's record and event stream")
    show.add_argument("call_id")
    show.add_argument("--json", action="store_true", help="one JSON object: {record, events}")
    show.add_argument("--redis-url", default=None,
                      help="default: REDIS_URL, else the embedded Redis of a bot running under BOT_DATA_DIR")
    show.set_defaults(func=run_show)
    live = csub.add_parser("live", help="calls in progress on any worker")
    live.add_argument("--redis-url", default=None, help="as for show")
    live.set_defaults(func=run_live)




def _url(args: argparse.Namespace) -> str:
    from bot.config import load_settings
    from bot.redis_embedded import cli_redis_url

    url = cli_redis_url(args.redis_url)
    if not url:
        print("error: no Redis: set REDIS_URL or pass --redis-url (no bot with embedded Redis is running under "
              f"{load_settings().data_dir})", file=sys.stderr)
    return url


async def _with_store(url: str, fn: Any) -> Any:
    from bot.state import CallStore, connect

    store = CallStore(connect(url), worker="cli", ttl_s=0)
    try:
        return await fn(store)
    finally:
        await store.r.aclose()


def _query(args: argparse.Namespace, fn: Any) -> tuple[int, Any]:
    """fn(store) on the Redis the command names: (0, its result), or (exit code, None) after one error line."""
    url = _url(args)
    if not url:
        return 2, None
    try:
        return 0, asyncio.run(_with_store(url, fn))
    except Exception as exc:  # noqa: BLE001 - unreachable Redis, a bad URL: a message, not a traceback
        print(f"error: cannot read Redis at {url}: {exc}", file=sys.stderr)
        return 3, None


def _masked(rec: dict[str, Any]) -> dict[str, Any]:
    """The CLI prints what a support person may see: the caller number masked."""
    out = dict(rec)
    if "caller" in out:
        out["caller"] = out.get("caller_masked") or mask_digits(out["caller"])
    return out


def _s(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _float(v: Any) -> float | None:
    from bot.state import finite_float  # imported when a command runs, not by every `bot` start-up

    return finite_float(v)


def run_show(args: argparse.Namespace) -> int:
    rc, got = _query(args, lambda s: s.get_call(args.call_id))
    if rc:
        return rc
    if got is None:
        print(f"error: no call {args.call_id} (unknown id, or its record expired; `bot calls` lists recent calls)",
              file=sys.stderr)
        return 1
    got["record"] = _masked(got["record"])
    _tolerant_stdout()
    if args.json:
        print(json.dumps(got, indent=2, default=str, ensure_ascii=False))
        return 0
    print("\n".join(render_story(got["record"], got["events"], call_id=args.call_id)))
    return 0


def _tolerant_stdout() -> None:
    """Transcripts are any language: on a C/ASCII locale (cron, ssh without LANG) print escapes, not a traceback."""
    reconf = getattr(sys.stdout, "reconfigure", None)
    if reconf is not None:
        try:
            reconf(errors="backslashreplace")
        except (ValueError, OSError):
            pass


# ---- the readable timeline ----

def _clip(text: Any, n: int = 160) -> str:
    s = " ".join(str(text).split())  # a newline in a transcript must not break the timeline's layout
    return s if len(s) <= n else s[: n - 1] + "…"


def _quote(text: Any) -> str:
    return '"' + _clip(mask_digits(str(text))) + '"'


def _slots(slots: Any) -> str:
    if not isinstance(slots, dict) or not slots:
        return ""
    return " " + ", ".join(f"{k}={mask_digits(str(v))}" for k, v in slots.items())


def _heard(candidates: Any) -> str:
    """Several values said for one slot ("no, fifty, not fifteen"): what the policy chose from."""
    if not isinstance(candidates, dict) or not candidates:
        return ""
    return " " + ", ".join(f"heard {k} " + " or ".join(mask_digits(str(v)) for v in vs)
                           for k, vs in candidates.items() if isinstance(vs, list))


def _conf(v: Any) -> str:
    f = _float(v)
    return f"{f:.2f}" if f is not None else "?"


def _decision(d: Any) -> str:
    if not isinstance(d, dict):
        return ""
    out = f" -> {d.get('action', '?')}"
    if d.get("target"):
        out += f" {d['target']}"
    if d.get("reason"):
        out += f" ({d['reason']})"
    return out


def _generic(e: dict[str, Any]) -> str:
    rest = {k: v for k, v in e.items() if k not in ("id", "t", "type")}
    return _clip(mask_digits(json.dumps(rest, default=str, ensure_ascii=False)))


def _describe(e: dict[str, Any]) -> list[str]:
    """One event as lines a person reads: what the bot said, what the caller said and was understood as, why."""
    et = e.get("type")
    if "raw" in e and et is not None:  # its payload was not a JSON object: show what is there, guess nothing
        return [f"{et} (unreadable payload): {_clip(mask_digits(str(e['raw'])))}"]
    if et == "call_started":
        return [f"call started ({e.get('transport', '?')}, policy {e.get('policy_version', '?')}, "
                f"worker {e.get('worker', '?')})"]
    if et == "call_resumed":
        if e.get("transport") == "sip":
            return [f"call carried on by worker {e.get('worker', '?')} (leg {e.get('leg', '?')}): the phone was "
                    "re-INVITEd after the process holding the call died (its restart, or another host)"]
        if e.get("transport") == "webrtc":
            return [f"call carried on by a new connection from the browser (leg {e.get('leg', '?')}, worker "
                    f"{e.get('worker', '?')}): the worker holding it went away"]
        return [f"call back on a new stream (leg {e.get('leg', '?')}, worker {e.get('worker', '?')}): "
                "the previous stream was lost with the caller on the line"]
    if et == "resume_failed":
        return [f"a new connection from the browser to carry the call on (leg {e.get('leg', '?')}) never connected "
                f"({e.get('reason', '?')}, after {e.get('waited_s', '?')} s): the browser may try again"]
    if et == "sip_takeover":
        return [f"not carried on after its worker died: {e.get('result', '?')}"
                + (" (the phone was sent a BYE)" if e.get("result") == "hung_up" else "")]
    if et == "call_reclaimed":
        return [f"call taken back by worker {e.get('worker', '?')}: it had only been cut off from Redis, and "
                f"{e.get('reaped_by') or 'a reaper'} had ended it as lost"]
    if et == "stream_lost":
        return [f"stream lost again: no new stream, {e.get('action', '?')} {e.get('target') or ''}".rstrip()]
    if et == "greeting_started":
        return [f"greeting started ({e.get('latency_ms', '?')} ms after answer)"]
    if et == "prompt_heard":
        heard = "" if not e.get("interrupted") else \
            f" [cut off after {e.get('heard_ms', '?')} of {e.get('duration_ms', '?')} ms]"
        return [f"bot said ({e.get('kind', '?')}): {_quote(e.get('text', ''))}{heard}"]
    if et == "turn":
        n = e.get("n", "?")
        if e.get("error"):
            return [f"caller turn {n}: not understood ({e['error']}){_decision(e.get('decision'))}"]
        if not any(k in e for k in ("intent", "confidence", "transcript", "decision")):
            return [f"caller turn {n}: (no details recorded) {_generic(e)}"]
        lines = [f"caller turn {n}: {_quote(e.get('transcript') or '')}"]
        intent = e.get("intent") or "no intent"
        lines.append(f"  understood {intent} ({_conf(e.get('confidence'))}){_slots(e.get('slots'))}"
                     f"{_heard(e.get('slot_candidates'))}{_decision(e.get('decision'))}")
        return lines
    if et == "first_audio":
        v2v = e.get("voice_to_voice_ms")
        return [f"bot starts speaking ({e.get('kind', '?')}) {e.get('latency_ms', '?')} ms after the turn"
                + (f", voice-to-voice {v2v} ms" if v2v is not None else "")]
    if et == "dtmf_turn":
        return [f"caller keyed {e.get('digits_len', '?')} digits{_decision(e.get('decision'))}"]
    if et == "dtmf":
        return ["caller pressed a key"]  # the digit itself can be part of a PIN or card number
    if et == "transfer":
        result = "ok" if e.get("ok") else "FAILED"
        why = e.get("error") or e.get("detail")  # the bridge's reason, when the event carries it
        return [f"transfer to {e.get('target', '?')}: {result}" + (f" ({_clip(mask_digits(str(why)))})" if why else "")
                + f", asked for by {e.get('reason', '?')}"]
    if et == "callback":
        return [f"callback requested on queue {e.get('queue', '?')}"]
    if et == "barge_in" or et == "prompt_cancelled":
        return [f"{et.replace('_', ' ')}: {_generic(e)}"]
    if et == "no_input":
        return ["no input from the caller"]
    if et == "error":
        detail = _clip(mask_digits(str(e.get("detail", ""))))
        return [f"ERROR in {e.get('component', '?')}: {e.get('kind', '?')} {detail}"]
    if et == "call_ended":
        dur = _float(e.get("duration_s"))
        return [f"call ended: {e.get('outcome', '?')}" + (f" after {dur:.1f} s" if dur is not None else "")
                + (f", {_turns(e['turns'])}" if "turns" in e else "")] + _audio(e.get("audio"))
    if et is None:
        return [f"(event without a type) {_generic(e)}"]
    return [f"{et}: {_generic(e)}" if len(e) > 3 else str(et)]


def _audio(q: Any) -> list[str]:
    """A SIP call's RTP quality (telephony/sip/quality.py) in words: which way the audio suffered, if it did."""
    if not isinstance(q, dict) or "rx_loss_pct" not in q:
        return []
    line = (f"  audio from the caller: {_float(q.get('rx_loss_pct')) or 0:.1f} % lost, "
            f"jitter {_float(q.get('rx_jitter_ms')) or 0:.0f} ms")
    if "peer_loss_pct" in q:
        line += (f"; to the caller (its RTCP): {_float(q.get('peer_loss_pct')) or 0:.1f} % lost, "
                 f"jitter {_float(q.get('peer_jitter_ms')) or 0:.0f} ms")
    if "rtt_ms" in q:
        line += f"; round trip {_float(q.get('rtt_ms')) or 0:.0f} ms"
    return [line]


def _sip_security(rec: dict[str, Any]) -> str:
    """ " (tls, srtp)": how a SIP call's signalling and audio travelled (encrypted or not), when recorded."""
    parts = [str(rec[k]) for k in ("signalling", "media") if rec.get(k)]
    return f" ({', '.join(parts)})" if parts else ""


def _turns(n: Any) -> str:
    return f"{n} turn" if str(n) == "1" else f"{n} turns"


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if t is not None else "?"


def render_story(rec: dict[str, Any], events: list[dict[str, Any]], now: float | None = None,
                 call_id: str = "?") -> list[str]:
    """The call as an on-call engineer reads it: a header, then every event at its time since the call started."""
    now = time.time() if now is None else now
    times = [e["t"] for e in events if isinstance(e.get("t"), (int, float))]
    t0 = _float(rec.get("started_at"))
    if t0 is None and times:
        t0 = min(times)
    status = rec.get("status") or "?"
    if status == "active":
        age = f", {now - t0:.0f} s so far" if t0 is not None else ""
        status_line = f"in progress{age} (live: run again for more)"
    elif status == "ended":
        dur = _float(rec.get("duration_s"))
        status_line = f"ended: {rec.get('outcome') or '?'}" + (f" after {dur:.1f} s" if dur is not None else "")
        if rec.get("turns"):
            status_line += f", {_turns(rec['turns'])}"
    else:
        status_line = f"{status} {rec.get('outcome', '')}".strip()
    out = [f"call     {rec.get('call_id') or call_id}",
           f"caller   {rec.get('caller') or '?'} -> {rec.get('called') or '?'}",  # called: our own line
           f"via      {rec.get('transport') or '?'}{_sip_security(rec)} on {rec.get('worker') or '?'}, "
           f"policy {rec.get('policy_version') or '?'}",
           f"started  {_when(t0)}",
           f"status   {status_line}"]
    if rec.get("leg") and rec.get("leg") != "1":
        what = {"sip": "the phone was re-INVITEd after its worker died",
                "webrtc": "the browser reconnected after its worker died"}.get(str(rec.get("transport")),
                                                                               "the call came back after a lost stream")
        out.append(f"legs     {rec['leg']} ({what}; turns are the last leg's)")
    if not rec:
        out.append("note     no call record (expired or never written): events only")
    out.append("")
    for e in events:
        t = e.get("t")
        rel = f"{f'+{t - t0:.3f}':>9}s" if isinstance(t, (int, float)) and t0 is not None else f"{'?':>9}s"
        for i, line in enumerate(_describe(e)):
            out.append(f"{rel if i == 0 else ' ' * len(rel)}  {line}")
    if not events:
        out.append("(no events)")
    if status == "active":
        out.append("... call still in progress")
    return out


def run_live(args: argparse.Namespace) -> int:
    rc, live = _query(args, lambda s: s.live_calls())
    if rc:
        return rc
    print(json.dumps(live, indent=2))
    return 0


async def _recent(store: Any, limit: int) -> list[dict[str, str]]:
    from bot.state import RECENT, call_key

    ids = [_s(i) for i in await store.r.zrevrange(RECENT, 0, max(limit, 1) - 1)]
    out = []
    for cid in ids:
        rec = {_s(k): _s(v) for k, v in (await store.r.hgetall(call_key(cid))).items()}
        out.append({"call_id": cid, **_masked(rec)} if rec else {"call_id": cid, "status": "expired"})
    return out


def run_list(args: argparse.Namespace) -> int:
    rc, calls = _query(args, lambda s: _recent(s, args.limit))
    if rc:
        return rc
    _tolerant_stdout()
    if not calls:
        print("no calls")
        return 0
    print(f"{'started (UTC)':19}  {'call_id':40}  {'via':7}  {'status':8}  {'outcome':16}  {'dur_s':>6}  caller")
    for c in calls:
        t = _float(c.get("started_at"))
        when = datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if t is not None else "?"
        dur = _float(c.get("duration_s"))
        print(f"{when:19}  {c['call_id']:40}  {c.get('transport', ''):7}  {c.get('status', ''):8}  "
              f"{c.get('outcome', ''):16}  {(f'{dur:.1f}' if dur is not None else ''):>6}  {c.get('caller', '')}")
    return 0
