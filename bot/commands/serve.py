"""`bot serve [--workers N]`: the bot (Twilio + SIP + metrics) in the foreground."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="run the bot: Twilio webhook/stream, SIP, /metrics, /healthz, /readyz")
    p.add_argument("--workers", type=_bounded(1, None), default=None, metavar="N",
                   help="worker processes sharing the HTTP port (default: BOT_WORKERS, else 1)")
    p.add_argument("--port", type=_bounded(0, 65535), default=None,
                   help="HTTP port (default: BOT_HTTP_PORT, else 8080)")
    p.add_argument("--worker-child", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _bounded(lo: int, hi: int | None) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi], so `--workers 0` is refused instead of silently meaning
    BOT_WORKERS, and `--port 99999` is refused before the embedded Redis starts."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"must be {bounds}")
        return value

    return parse


def run(args: argparse.Namespace) -> int:
    import errno
    import os
    import sys

    from ops.logs import get_logger

    if args.port is not None:
        os.environ["BOT_HTTP_PORT"] = str(args.port)
    from bot import serve
    from bot.config import load_settings

    if args.worker_child:
        return serve.run_worker(load_settings())
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
