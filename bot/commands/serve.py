"""`bot serve [--workers N]`: the bot (Twilio + SIP + metrics) in the foreground."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import TYPE_CHECKING

from bot.commands import int_between

if TYPE_CHECKING:
    from bot.config import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="run the bot: Twilio webhook/stream, SIP, /metrics, /healthz, /readyz")
    p.add_argument("--workers", type=int_between(1), default=None, metavar="N",
                   help="worker processes sharing the HTTP port (default: BOT_WORKERS, else 1)")
    p.add_argument("--port", type=int_between(0, 65535), default=None,
                   help="HTTP port (default: BOT_HTTP_PORT, else 8080)")
    p.add_argument("--worker-child", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)




def _local_host(host: str) -> str:
    """The address a caller on this machine dials for a bot listening on `host`."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def how_to_call(settings: Settings, sip_enabled: bool) -> list[str]:
    """What a newcomer does next once `make run` is up: the commands and addresses, for this bot's ports."""
    host = _local_host(settings.http_host)
    base = f"http://{host}:{settings.http_port}"
    token = "$BOT_ADMIN_TOKEN" if settings.admin_token else (
        "see BOT_ADMIN_TOKENS_FILE" if settings.admin_tokens_file else f"cat {settings.data_dir / 'admin-token'}")
    lines = [f"bot serve: ready on {base}",
             f"  test call (Twilio protocol): .venv/bin/bot call --url {base} YOUR.wav --record /tmp/bot.wav"]
    if sip_enabled:
        lines.append(f"  SIP: sip:bot@{host}:{settings.sip_port} (softphone or PBX trunk; "
                     f"test: .venv/bin/bot call --sip {host}:{settings.sip_port} YOUR.wav)")
    lines += [f"  browser softphone + admin console: {base}/admin (token: {token})",
              f"  a real Twilio number: expose {base} over HTTPS (e.g. ngrok http {settings.http_port}), set "
              "BOT_PUBLIC_URL, and point the number's webhook at https://YOUR-HOST/twilio/voice (README.md)",
              f"  calls so far: .venv/bin/bot calls    health: {base}/readyz    metrics: {base}/metrics"]
    return lines


def _announce_when_ready(settings: Settings, stop: threading.Event, progress_s: float = 15.0) -> None:
    """On a terminal: a line while the (long, first-time) start-up runs, and how to call the bot once /readyz
    says ready. A thread polling the bot over HTTP, so the bot's own start-up is untouched."""
    import urllib.error
    import urllib.request

    base = f"http://{_local_host(settings.http_host)}:{settings.http_port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via the user's http_proxy
    t0 = time.monotonic()
    next_note = t0 + progress_s
    while not stop.wait(0.5):
        try:
            with opener.open(f"{base}/readyz", timeout=2) as r:
                ready = r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            ready = False
        if ready:
            print("\n".join(how_to_call(settings, settings.sip_enabled)), file=sys.stderr, flush=True)
            return
        if time.monotonic() >= next_note:
            next_note += progress_s
            print(f"bot serve: still starting ({time.monotonic() - t0:.0f} s): the first start renders the "
                  f"greeting and first prompts into {settings.data_dir / 'voice-cache'} (the rest follow in the "
                  "background); later starts reuse them. Ctrl-C stops it", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import errno
    import os

    from ops.logs import get_logger

    if args.port is not None:
        os.environ["BOT_HTTP_PORT"] = str(args.port)
    from bot import serve
    from bot.config import load_settings, validate_environment

    if args.worker_child:
        return serve.run_worker(load_settings())
    # every setting checked before the embedded Redis or the engine starts: a typo is one line (exit 2)
    settings = validate_environment()
    stop = threading.Event()
    if sys.stderr.isatty() and settings.http_port:
        print(f"bot serve: starting on http://{settings.http_host}:{settings.http_port}"
              + (f" and SIP {settings.sip_port} (UDP+TCP)" if settings.sip_enabled else "")
              + "; Ctrl-C stops it", file=sys.stderr, flush=True)
        threading.Thread(target=_announce_when_ready, args=(settings, stop), name="serve-announce",
                         daemon=True).start()
    try:
        return serve.serve(args.workers)
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            raise
        # the first thing a newcomer hits when 8080 is taken: say which setting to change, not a traceback
        settings = load_settings()
        where = f"{settings.http_host}:{settings.http_port}"
        get_logger("bot.serve").error("http_bind_failed", address=where, error=exc.strerror)
        print(f"bot serve: error: cannot listen on {where} ({exc.strerror}): stop what holds it "
              f"(ss -ltnp 'sport = :{settings.http_port}') or pick another port (--port, BOT_HTTP_PORT, "
              "BOT_HTTP_HOST)", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # bot/redis_embedded.py says why the embedded Redis cannot start (a second `make run` on the same
        # BOT_DATA_DIR, redis-server exited) in a RuntimeError of its own: that line, not a traceback
        if "redis-server" not in str(exc):
            raise
        get_logger("bot.serve").error("embedded_redis_failed", error=str(exc))
        print(f"bot serve: error: {exc}", file=sys.stderr)
        return 1
    finally:
        stop.set()
