"""`bot call WAV... [--url URL] [--record out.wav] [--token T]`: a simulated caller over the Twilio
Media Streams protocol (or SIP with --sip HOST:PORT, provided by telephony/sip). Prints one JSON object."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("call", help="place a simulated call: play WAV turns, record the bot")
    p.add_argument("wavs", nargs="*", help="caller turns (WAV, any rate; 8 kHz mono is native)")
    p.add_argument("--url", default=None, help="bot base URL (default http://127.0.0.1:$BOT_HTTP_PORT)")
    p.add_argument("--record", default=None, help="write what the bot said to this WAV")
    p.add_argument("--signature", "--token", dest="token", default=None,
                   help="sign requests with this Twilio auth token (default: TWILIO_AUTH_TOKEN)")
    p.add_argument("--account-sid", default=None,
                   help="AccountSid the simulated Twilio sends (default: TWILIO_ACCOUNT_SID, else AC000...); the bot "
                        "transfers over REST under it")
    p.add_argument("--redis-url", default=None,
                   help="read the bot's decisions from this Redis (default REDIS_URL, else the embedded Redis of a bot "
                        "running under BOT_DATA_DIR)")
    p.add_argument("--reply-timeout", type=float, default=12.0, metavar="S",
                   help="seconds to wait for the bot's reply to each turn (default 12)")
    p.add_argument("--sip", default=None, metavar="HOST[:PORT]|sip:USER@HOST[:PORT]",
                   help="call over SIP/RTP instead (port default 5060; digest auth from BOT_SIP_USER/PASSWORD); "
                        "WAVs must then be 16-bit PCM")
    p.add_argument("--srtp", action="store_true",
                   help="with --sip: offer SRTP (AES_CM_128_HMAC_SHA1_80, keys in the SDP) instead of RTP; the summary "
                        "says whether the bot took it")
    p.set_defaults(func=run)


def _check_inputs(args: argparse.Namespace) -> str | None:
    """Why the call cannot be placed (a bad --sip target, a missing or unreadable WAV), before any
    network traffic: a typo gets one line naming it, not a traceback half-way through a call."""
    import wave

    import soundfile as sf

    if args.sip:
        try:
            from telephony.sip.uac import parse_target
        except ImportError:
            return None  # run() says the SIP caller is missing
        try:
            host, port, _user = parse_target(args.sip)
        except ValueError:
            host, port = "", -1
        if not host or not 0 < port < 65536:
            return f"--sip {args.sip!r}: expected HOST[:PORT] or sip:USER@HOST[:PORT]"
    elif getattr(args, "srtp", False):
        return "--srtp needs --sip (a call over the Twilio protocol has no RTP of its own)"
    elif args.url and not args.url.lower().startswith(("http://", "https://")):
        return f"--url {args.url!r}: expected http(s)://HOST[:PORT] (the bot's webhook base)"
    if args.reply_timeout <= 0:
        return "--reply-timeout must be > 0"
    for w in args.wavs:
        if not os.path.isfile(w):
            return f"no such file {w}"
        try:
            sf.info(w)
        except (sf.LibsndfileError, RuntimeError) as exc:
            return f"{w}: not a readable audio file ({exc})"
        if args.sip:  # the SIP caller reads WAVs with the wave module: 16-bit PCM only
            try:
                with wave.open(w, "rb") as f:
                    width = f.getsampwidth()
            except (wave.Error, EOFError) as exc:
                return f"{w}: --sip needs a 16-bit PCM WAV ({exc})"
            if width != 2:
                return f"{w}: --sip needs a 16-bit PCM WAV, got {8 * width}-bit"
    return None


def _why(exc: BaseException, url: str) -> str:
    """The failure in words a newcomer can act on: most often nothing listens at the URL yet."""
    import httpx

    if isinstance(exc, (httpx.ConnectError, ConnectionRefusedError)):
        return (f"no bot answers at {url} ({exc or type(exc).__name__}): start one with `make run` (or "
                "`.venv/bin/bot serve`) and wait for 'ready', or point --url at it")
    if isinstance(exc, httpx.TimeoutException):
        return f"the bot at {url} did not answer in time ({type(exc).__name__}): is it still starting?"
    return repr(exc)


def run(args: argparse.Namespace) -> int:
    if (problem := _check_inputs(args)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.sip:
        # hook for the SIP engineer: telephony.sip.uac.run_sip_call(args) -> exit code
        try:
            from telephony.sip.uac import cli_main as run_sip_call
        except ImportError:
            print("error: SIP caller not available (telephony.sip.uac)", file=sys.stderr)
            return 2
        return int(run_sip_call(args) or 0)
    from bot.redis_embedded import cli_redis_url
    from bot.simulator import run_call, turn_decisions

    url = args.url or f"http://127.0.0.1:{os.environ.get('BOT_HTTP_PORT', '8080').strip() or '8080'}"  # "": default
    token = args.token if args.token is not None else os.environ.get("TWILIO_AUTH_TOKEN", "")
    try:
        sid = args.account_sid or os.environ.get("TWILIO_ACCOUNT_SID") or None
        res = asyncio.run(run_call(url, args.wavs, auth_token=token, record=args.record, account_sid=sid,
                                   redis_url=cli_redis_url(args.redis_url) or None,
                                   reply_timeout_s=args.reply_timeout))
    except Exception as exc:  # noqa: BLE001
        from ops.logs import get_logger

        get_logger("bot.call").warning("call_failed", url=url, error=repr(exc))
        print(f"error: call failed: {_why(exc, url)}", file=sys.stderr)
        return 1
    out = res.summary()
    decisions = {d["n"]: d for d in turn_decisions(res.record)}
    for t in out["turns"]:
        t["bot"] = decisions.get(t["n"])
        eot = (t["bot"] or {}).get("eot_wait_ms")
        t["v2v_minus_eot_ms"] = None if t["v2v_ms"] is None or eot is None else round(t["v2v_ms"] - eot, 1)
    if res.record:
        out["outcome"] = res.record["record"].get("outcome")
    print(json.dumps(out, indent=2))
    return 0
