"""`bot load`: N concurrent simulated callers (Twilio and/or SIP) against a bot; prints calls held,
voice-to-voice p50/p95/p99, late/lost frames, errors, CPU and RSS per worker; writes CSV + PNG."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("load", help="load test: N concurrent simulated callers, latency/CPU report, CSV + PNG")
    p.add_argument("--url", default=None,
                   help="bot HTTP base URL (Twilio webhook/stream; default http://127.0.0.1:$BOT_HTTP_PORT, as bot call)")
    p.add_argument("--sip", default="", help="SIP server host:port (callers with --sip-fraction dial it)")
    p.add_argument("--calls", type=int, default=4, help="concurrent callers at full load")
    p.add_argument("--ramp-s", type=float, default=10.0, help="seconds to bring all callers up")
    p.add_argument("--duration-s", type=float, default=60.0, help="seconds callers keep calling")
    p.add_argument("--turns", type=int, default=2, help="caller turns per call")
    p.add_argument("--sip-fraction", type=float, default=0.0, help="share of callers on SIP (0..1)")
    p.add_argument("--wav", action="append", default=[], help="caller turn WAV (repeat); default: espeak-ng phrases")
    p.add_argument("--token", default="", help="TWILIO_AUTH_TOKEN of the bot, to sign requests")
    p.add_argument("--out", default="var/load", help="directory for turns.csv, calls.csv, samples.csv, load.png")
    p.add_argument("--pid", type=int, action="append", default=[], help="bot process id to sample CPU/RSS (repeat)")
    p.add_argument("--redis-url", default="", help="the bot's REDIS_URL: adds the server-side latency breakdown")
    p.add_argument("--spawn", action="store_true", help="start a local `bot serve` (embedded Redis) to test")
    p.add_argument("--workers", type=int, default=1, help="with --spawn: worker processes")
    p.add_argument("--budget-ms", type=float, default=800.0, help="p95 voice-to-voice budget")
    p.add_argument("--budget-basis", choices=("caller", "processing"), default="caller",
                   help="judge p95 on voice-to-voice at the caller, or on it minus the end-of-turn wait (needs Redis)")
    p.add_argument("--find-max", action="store_true",
                   help="step --calls up (from --calls by --step) until p95 exceeds the budget; report the largest N held")
    p.add_argument("--step", type=int, default=2, help="with --find-max: callers added per step")
    p.add_argument("--max-calls", type=int, default=64, help="with --find-max: stop here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ops.load.harness import LoadConfig, LoadRun, format_summary
    from ops.load.procstat import bot_pids
    from ops.load.spawn import BotProcess

    if (args.calls < 1 or not 0 <= args.sip_fraction <= 1 or args.duration_s <= 0 or args.turns < 1
            or args.ramp_s < 0 or args.workers < 1):
        print("bot load: --calls >= 1, --turns >= 1, --duration-s > 0, --ramp-s >= 0, --workers >= 1 and "
              "0 <= --sip-fraction <= 1 are required", file=sys.stderr)
        return 2
    if args.sip_fraction > 0 and not args.sip and not args.spawn:
        # the harness would quietly place every call over Twilio: a "SIP" run that never touched SIP
        print("bot load: --sip-fraction needs --sip HOST:PORT (the bot's SIP address) or --spawn", file=sys.stderr)
        return 2
    if args.find_max and (args.step < 1 or args.max_calls < args.calls):
        print("bot load: --find-max needs --step >= 1 and --max-calls >= --calls", file=sys.stderr)
        return 2
    for w in args.wav:
        if not Path(w).is_file():
            print(f"bot load: no such WAV: {w}", file=sys.stderr)
            return 2
        try:  # before --spawn starts a bot: a file that is no audio is one clear line, not a traceback later
            import soundfile as sf

            sf.info(w)
        except (RuntimeError, OSError) as exc:
            print(f"bot load: not a readable WAV: {w} ({exc})", file=sys.stderr)
            return 2
    server = None
    import os

    # the same default as `bot call`: a bot moved off a taken 8080 with BOT_HTTP_PORT is found by both
    url = args.url or f"http://127.0.0.1:{os.environ.get('BOT_HTTP_PORT', '8080').strip() or '8080'}"
    sip, pids, redis_url = args.sip, list(args.pid), args.redis_url
    if args.spawn:
        try:
            server = BotProcess(Path(tempfile.mkdtemp(prefix="bot-load-")), workers=args.workers,
                                sip=args.sip_fraction > 0).start()
        except (RuntimeError, OSError) as exc:  # it exited or never got ready: its log tail says why
            print(f"bot load: --spawn could not start `bot serve`: {exc}", file=sys.stderr)
            return 2
        url = server.url
        sip = f"127.0.0.1:{server.sip_port}" if server.sip_port else ""
        assert server.proc is not None
        pids = bot_pids(server.proc.pid)
        redis_url = f"redis://127.0.0.1:{server.env['BOT_EMBEDDED_REDIS_PORT']}/0"
    try:
        if server is None and (problem := preflight(url)):
            # otherwise every caller fails quietly for --duration-s and the report says only "NOT HELD"
            print(f"bot load: {problem}", file=sys.stderr)
            return 2
        steps = range(args.calls, args.max_calls + 1, max(args.step, 1)) if args.find_max else [args.calls]
        best = 0
        results = []
        for n in steps:
            cfg = LoadConfig(url=url, sip=sip, calls=n, ramp_s=args.ramp_s, duration_s=args.duration_s,
                             turns=args.turns, sip_fraction=args.sip_fraction, wavs=args.wav, auth_token=args.token,
                             out_dir=str(Path(args.out) / f"n{n}") if args.find_max else args.out,
                             budget_ms=args.budget_ms, redis_url=redis_url,
                             budget_basis=args.budget_basis)
            lr = LoadRun(cfg, pids)
            try:
                summary = asyncio.run(lr.run())
            except (RuntimeError, OSError, ValueError) as exc:  # before any call: a WAV that is no WAV, no espeak-ng
                print(f"bot load: cannot prepare the callers: {exc}", file=sys.stderr)
                return 2
            summary["files"] = lr.write(summary)
            results.append(summary)
            print(json.dumps(summary) if args.json else f"--- {n} callers ---\n{format_summary(summary)}", flush=True)
            if not summary["held"]:
                break
            best = n
        if args.find_max:
            print(f"largest N held with p95 <= {args.budget_ms:.0f} ms: {best}")
        return 0 if results and (results[-1]["held"] or (args.find_max and best)) else 1
    finally:
        if server is not None:
            server.stop()


def preflight(url: str) -> str:
    """Why the bot at `url` cannot take test calls ("" when it can): nothing listening, or not ready."""
    import httpx

    try:
        r = httpx.get(f"{url.rstrip('/')}/readyz", timeout=5)
    except httpx.HTTPError as exc:
        return (f"no bot answers at {url} ({type(exc).__name__}): start one with `bot serve`, "
                "point --url at it, or use --spawn")
    if r.status_code == 200:
        return ""
    try:
        body = r.json()
    except ValueError:
        body = {}
    if isinstance(body, dict) and body.get("draining"):
        return f"the bot at {url} is draining (shutting down) and refuses new calls"
    if r.status_code == 503:
        return f"the bot at {url} is not ready yet (/readyz 503: {r.text[:200]}); retry once it reports ready"
    return f"{url}/readyz answered {r.status_code}: is --url the bot's HTTP address?"
