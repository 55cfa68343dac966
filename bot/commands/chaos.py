"""`bot chaos`: restart/stall Redis, SIGKILL a worker, make the engine throw, lose SIP callers' RTP, all
while simulated callers (Twilio Media Streams or SIP) talk to local `bot serve` workers; prints what held
and what did not."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ops.chaos.harness import SCENARIOS

    p = sub.add_parser("chaos", help="fault injection while calls run: Redis restart/stall, worker kill, engine fault, "
                       "SIP calls through a Redis restart or RTP loss")
    p.add_argument("--scenario", action="append", choices=SCENARIOS, default=[],
                   help="scenario to run (repeat); default: all")
    p.add_argument("--lines", type=int, default=2, help="simulated callers per scenario")
    p.add_argument("--work", default="", help="directory for logs, Redis AOF and WAVs (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print findings as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ops.chaos.harness import SCENARIOS, format_findings, run_chaos

    if args.lines < 1:
        print("bot chaos: error: --lines must be >= 1", file=sys.stderr)  # stdout may be parsed (--json)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="bot-chaos-"))
    findings = asyncio.run(run_chaos(work, tuple(args.scenario) or SCENARIOS, args.lines))
    if args.json:
        print(json.dumps([{"scenario": f.scenario, "ok": f.ok, "checks": f.checks} for f in findings], default=str))
    else:
        print(format_findings(findings))
        print(f"logs: {work}")
    return 0 if all(f.ok for f in findings) else 1
