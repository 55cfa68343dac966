"""`bot serve [--workers N]`: the bot (Twilio + SIP + metrics) in the foreground."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="run the bot: Twilio webhook/stream, SIP, /metrics, /healthz, /readyz")
    p.add_argument("--workers", type=int, default=None, help="worker processes sharing the port (BOT_WORKERS)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (BOT_HTTP_PORT, default 8080)")
    p.add_argument("--worker-child", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    if args.port is not None:
        os.environ["BOT_HTTP_PORT"] = str(args.port)
    from bot import serve
    from bot.config import load_settings

    if args.worker_child:
        return serve.run_worker(load_settings())
    return serve.serve(args.workers)
