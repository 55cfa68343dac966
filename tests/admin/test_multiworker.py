"""Two `bot serve` processes sharing one Redis: a publish switches both within a second (measured
from the publish's audit time to each worker's `policy_switched` log line), new calls on either
worker start on the new version, and a call already in progress keeps the version it started with."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from bot.simulator import TwilioCaller, fetch_call
from tests.helpers.server import BotServer, isolated_redis_url, metric_value

TOKEN = "multiworker-publisher-token"
MARK = "Version two."
pytestmark = pytest.mark.slow


def v2_yaml(v1_text: str) -> str:
    """v2 differs in the greeting and in the prompt keypad "1" leads to (pay_bill asks the amount):
    two new sentences for the publisher to pre-render, and a turn whose prompt depends on no model."""
    doc = yaml.safe_load(v1_text)
    assert doc["dtmf"]["options"]["1"] == "pay_bill" and doc["intents"]["pay_bill"]["action"]["ask"]["amount"] == "ask_amount"
    for key in (doc["greeting"], "ask_amount"):
        doc["prompts"][key] = f"{doc['prompts'][key]} {MARK}"
    return yaml.safe_dump(doc, sort_keys=False)


def switch_time(server: BotServer, version: int) -> float | None:
    for line in server.logs().splitlines():
        if '"policy_switched"' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("version") == version:
            return dt.datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()
    return None


def prompts_heard(record: dict) -> list[str]:
    return [e.get("text", "") for e in record["events"] if e["type"] == "prompt_heard"]


def test_two_workers_switch_within_a_second(redis_url: str, tmp_path: Path) -> None:
    url = isolated_redis_url(redis_url)
    env = {"BOT_ADMIN_TOKEN": TOKEN, "BOT_NO_INPUT_S": "30"}
    redis.Redis.from_url(url).flushdb()
    servers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        servers.append(BotServer(url, tmp_path / name, env={**env, "BOT_WORKER_ID": f"worker-{name}"}, flush_db=False))
    a, b = servers
    try:
        with ThreadPoolExecutor(2) as ex:  # both start (and race to seed v1: one wins) at once
            for fut in [ex.submit(s.start) for s in servers]:
                fut.result(timeout=180)
        asyncio.run(_scenario(a, b, url))
    finally:
        a.stop()
        b.stop()


async def _scenario(a: BotServer, b: BotServer, redis_url: str) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(timeout=120) as http:
        v1 = (await http.get(f"{a.url}/admin/api/policies/1", headers=headers)).json()["yaml"]

        # a call in progress on worker A, started on v1
        caller = TwilioCaller(a.url)
        await caller.connect()
        assert await caller.wait_bot_quiet(quiet_s=0.5, timeout_s=30), "no greeting"

        r = await http.post(f"{b.url}/admin/api/publish", headers=headers,
                            json={"yaml": v2_yaml(v1), "expected_version": 1, "comment": "multi-worker"})
        assert r.status_code == 200, r.text
        audit = (await http.get(f"{a.url}/admin/api/audit", headers=headers)).json()
        published_at = next(e["ts"] for e in audit if e["action"] == "publish")

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(metric_value(s.metrics(), "voicebot_policy_version") == 2 for s in (a, b)):
                break
            await asyncio.sleep(0.05)
        lags = {}
        for s in (a, b):
            t = switch_time(s, 2)
            assert t is not None, f"{s.url} never switched to v2"
            lags[s.url] = t - published_at
        print("switch lag after publish (s):", {k: round(v, 3) for k, v in lags.items()})
        assert all(lag < 1.0 for lag in lags.values()), lags

        # the call in progress keeps v1: keypad 1 (pay_bill) is answered with v1's ask_amount prompt
        v1_ask = yaml.safe_load(v1)["prompts"]["ask_amount"]
        await caller.send_dtmf("1")
        await caller.send_dtmf("#")
        assert await caller.wait_bot_quiet(quiet_s=0.5, timeout_s=30), "no answer to the keypad"
        await caller.hangup()
        await asyncio.sleep(0.5)
        old = await fetch_call(a.url, caller.call_sid, redis_url)
        assert old is not None and old["record"]["policy_version"] == "1"
        turns = [e for e in old["events"] if e["type"] == "dtmf_turn"]
        assert turns, [e["type"] for e in old["events"]]
        assert turns[0]["decision"]["prompt"] == v1_ask and turns[0]["decision"]["intent"] == "pay_bill"
        assert v1_ask in prompts_heard(old) and all(MARK not in p for p in prompts_heard(old))

        # new calls on either worker start on v2 and say v2's prompts
        for s in (a, b):
            c = TwilioCaller(s.url)
            await c.connect()
            assert await c.wait_bot_quiet(quiet_s=0.5, timeout_s=40), "no greeting"
            await c.hangup()
            await asyncio.sleep(0.3)
            rec = await fetch_call(s.url, c.call_sid, redis_url)
            assert rec is not None and rec["record"]["policy_version"] == "2"
            assert any(MARK in p for p in prompts_heard(rec)), prompts_heard(rec)
