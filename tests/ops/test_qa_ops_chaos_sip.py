"""`bot chaos` over SIP: callers on the project's own UAC (telephony/sip/uac.py) dial worker 0's SIP server
while Redis restarts, and while a share of their RTP is lost. Each finding must prove its fault reached the
calls (a new redis-server with the AOF data back; the callers' drops short the bot's own count of received
RTP), not only that calls survived."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bot.state import HEARTBEAT_S
from ops.chaos.harness import RTP_LOSS
from ops.load.spawn import ROOT

pytestmark = pytest.mark.slow


def _chaos(tmp: Path, *scenarios: str) -> list[dict]:
    args = [a for s in scenarios for a in ("--scenario", s)]
    r = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "bot.cli", "chaos", *args, "--work", str(tmp),
                        "--json"], cwd=ROOT, capture_output=True, text=True, timeout=480)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith('[{"scenario"')), None)
    assert line, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(line)


def test_sip_calls_through_redis_restart_and_rtp_loss(tmp_path: Path) -> None:
    findings = {f["scenario"]: f for f in _chaos(tmp_path, "sip-redis-restart", "sip-rtp-loss")}
    assert set(findings) == {"sip-redis-restart", "sip-rtp-loss"}

    c = findings["sip-redis-restart"]["checks"]
    assert "exception" not in c, c
    assert c["transport"] == "sip" and c["calls"] >= 2, c
    assert c["injected"] == {"restarted": True, "aof_kept_data": True}, c  # the fault really happened
    assert c["warmed_up"] and c["calls_live_at_fault"] >= 1, c  # ... to SIP calls in progress
    assert c["events_written"] > 0 and c["events_found"] == c["events_written"] and not c["duplicates"], c
    assert not c["calls_not_ended"] and c["silent_turns"] == 0 and not c["call_errors"], c

    c = findings["sip-rtp-loss"]["checks"]
    assert "exception" not in c, c
    inj = c["injected"]
    assert inj["loss"] == RTP_LOSS and inj["caller_rtp_sent_under_loss"] > 500, inj
    # the callers dropped about the share asked for, and the bot counted about that many fewer packets in
    assert abs(inj["caller_rtp_dropped"] / inj["caller_rtp_sent_under_loss"] - RTP_LOSS) < 0.4 * RTP_LOSS, inj
    assert inj["bot_rtp_missing"] >= 0.8 * inj["caller_rtp_dropped"] > 0, inj
    assert c["calls_live_at_fault"] >= 1 and c["turns_under_loss"] >= 1, c
    assert c["turns_unanswered_under_loss"] == 0 and c["silent_turns"] == 0 and not c["call_errors"], c
    assert c["events_found"] == c["events_written"] > 0 and not c["calls_not_ended"], c
    assert all(f["ok"] for f in findings.values()), json.dumps(findings, indent=1)


def test_a_bot_that_cannot_start_is_reported_and_leaves_no_redis_behind(tmp_path: Path) -> None:
    """`bot chaos` whose bot cannot start (here: a malformed setting it inherits) reports every scenario
    failed with the reason, exits 1, and stops the redis-server it started (it used to be left running,
    and the command died with a traceback and no findings)."""
    import os

    env = {**os.environ, "BOT_ESCALATION_WEBHOOK": "not-a-url"}
    r = subprocess.run([sys.executable, "-m", "bot.cli", "chaos", "--scenario", "redis-stall", "--scenario",
                        "sip-rtp-loss", "--work", str(tmp_path), "--json"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith('[{"scenario"'))
    findings = json.loads(line)
    assert [f["scenario"] for f in findings] == ["redis-stall", "sip-rtp-loss"]
    assert all(not f["ok"] and "setup failed" in f["checks"]["exception"] and "BOT_ESCALATION_WEBHOOK"
               in f["checks"]["exception"] for f in findings), findings
    # no redis-server of this run is left: none has its data dir under our work dir
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd").startswith(str(tmp_path)):
                left.append(pid)
        except OSError:
            continue
    assert not left, left


def test_sip_calls_of_a_killed_worker_0_come_back(tmp_path: Path) -> None:
    """Worker 0 (the SIP port) SIGKILLed while SIP callers talk: its replacement re-INVITEs every phone, each
    caller hears the bot again and gets answers, on the same call (lost leg `worker_lost`, then its real end)."""
    (f,) = _chaos(tmp_path, "sip-worker-kill")
    c = f["checks"]
    assert "exception" not in c, c
    assert c["warmed_up"] and c["calls_on_killed"] >= 1 and c["worker_restarted"], c
    assert all(c["killed_calls_reinvited"].values()), c
    assert all(ms >= 1000 for ms in c["killed_calls_heard_after_reinvite_ms"].values()), c
    assert all(n >= 1 for n in c["killed_calls_turns_answered_after_reinvite"].values()), c
    assert all(ends[0] == "worker_lost" and len(ends) == 2 for ends in c["killed_calls_ends"].values()), c
    assert c["sip_resumes_resumed"] >= c["calls_on_killed"], c
    assert f["ok"], json.dumps(f, indent=1)


def test_sip_calls_of_a_lost_host_come_back_from_another(tmp_path: Path) -> None:
    """A second host SIGKILLed for good while SIP callers talk to it: after BOT_SIP_TAKEOVER_AFTER_S the first
    host's worker 0 re-INVITEs every phone, which follows the call there; each caller hears the bot again and gets
    answers on the same call, the lost leg closed by the adopting worker."""
    (f,) = _chaos(tmp_path, "sip-host-loss")
    c = f["checks"]
    assert "exception" not in c, c
    assert c["warmed_up"] and c["calls_on_killed"] >= 1, c
    assert all(c["killed_calls_reinvited"].values()), c
    # not before the host has been silent that long: its last heartbeat came up to one beat before the kill
    assert all(c["takeover_after_s"] - HEARTBEAT_S <= s for s in c["killed_calls_back_after_s"].values()), c
    assert all(ms >= 1000 for ms in c["killed_calls_heard_after_reinvite_ms"].values()), c
    assert all(n >= 1 for n in c["killed_calls_turns_answered_after_reinvite"].values()), c
    assert all(ends == ["worker_lost", "caller_hangup"] for ends in c["killed_calls_ends"].values()), c
    assert all(v.endswith("-w0-sip-adopt") for v in c["killed_calls_reaped_by"].values()), c
    assert f["ok"], json.dumps(f, indent=1)
