"""Fixture building blocks: an always-open test policy, a shared data dir (voice cache), and
`place_call` to run a simulated Twilio caller against a BotServer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import redis
import yaml

from bot.simulator import TwilioCaller
from policies.schema import parse_policy

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "test-auth-token-0123456789"


def twilio_env(api_url: str, policy: Path, base_tmp: Path, **extra: str) -> dict[str, str]:
    """A test bot's environment: Twilio credentials pointed at the local fake REST server, the policy,
    no-input long enough not to fire mid-test, quick transfers, and the voice cache shared by every
    test server (base_tmp is tmp_path_factory.getbasetemp()). `extra` overrides (BOT_NO_INPUT_S=...)."""
    return {
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_API_BASE": api_url,
        "BOT_POLICY": str(policy), "BOT_NO_INPUT_S": "60", "BOT_TRANSFER_WAIT_S": "1",
        "BOT_DATA_DIR": str(base_tmp / "shared-data"), **extra,
    }


def open_policy(path: Path) -> Path:
    """The default policy with every queue open around the clock (tests must not depend on the hour)."""
    doc = yaml.safe_load((ROOT / "policies" / "default.yaml").read_text())
    for q in doc.get("queues", {}).values():
        q.pop("hours", None)
        q.pop("out_of_hours", None)
    text = yaml.safe_dump(doc, sort_keys=False)
    parse_policy(text)  # still valid
    path.write_text(text)
    return path


def call_record(redis_url: str, call_sid: str) -> dict[str, Any]:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    rec = r.hgetall(f"call:{call_sid}")
    events = []
    for _id, f in r.xrange(f"call:{call_sid}:events"):
        events.append({"type": f["type"], "t": float(f["t"]), **json.loads(f.get("data", "{}"))})
    return {"record": rec, "events": events}


async def wait_outcome(redis_url: str, call_sid: str, timeout_s: float = 15.0) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        got = call_record(redis_url, call_sid)
        if got["record"].get("status") == "ended" or asyncio.get_running_loop().time() > deadline:
            return got
        await asyncio.sleep(0.1)


async def place_call(base_url: str, token: str = AUTH_TOKEN, **kw: Any) -> TwilioCaller:
    caller = TwilioCaller(base_url, token, account_sid=ACCOUNT_SID, **kw)
    await caller.connect()
    return caller
