"""`bot calls show CALL_ID [--json]` and `bot calls live`: call records and events from Redis."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime, timezone
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("calls", help="inspect calls stored in Redis")
    csub = p.add_subparsers(dest="calls_cmd", required=True)
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


def _masked(rec: dict[str, Any]) -> dict[str, Any]:
    """The CLI prints what a support person may see: the caller number masked."""
    out = dict(rec)
    if "caller" in out:
        out["caller"] = out.get("caller_masked", "")
    return out


def run_show(args: argparse.Namespace) -> int:
    url = _url(args)
    if not url:
        return 2
    try:
        got = asyncio.run(_with_store(url, lambda s: s.get_call(args.call_id)))
    except Exception as exc:  # noqa: BLE001
        print(f"error: cannot read Redis at {url}: {exc}", file=sys.stderr)
        return 3
    if got is None:
        print(f"error: no call {args.call_id}", file=sys.stderr)
        return 1
    got["record"] = _masked(got["record"])
    if args.json:
        print(json.dumps(got, indent=2, default=str))
        return 0
    rec = got["record"]
    for k in ("call_id", "transport", "caller", "status", "outcome", "policy_version", "worker"):
        print(f"{k:15} {rec.get(k, '')}")
    for e in got["events"]:
        ts = datetime.fromtimestamp(e["t"], timezone.utc).strftime("%H:%M:%S.%f")[:-3]
        rest = {k: v for k, v in e.items() if k not in ("id", "t", "type")}
        print(f"{ts} {e['type']:16} {json.dumps(rest, default=str)[:160]}")
    return 0


def run_live(args: argparse.Namespace) -> int:
    url = _url(args)
    if not url:
        return 2
    try:
        live = asyncio.run(_with_store(url, lambda s: s.live_calls()))
    except Exception as exc:  # noqa: BLE001 - unreachable Redis, a bad URL: a message, not a traceback
        print(f"error: cannot read Redis at {url}: {exc}", file=sys.stderr)
        return 3
    print(json.dumps(live, indent=2))
    return 0
