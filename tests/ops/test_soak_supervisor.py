"""`bot serve --workers N` over a long week: a worker that cannot start (here: an engine factory that does
not exist) is retried ever more slowly instead of in a tight restart loop that burns the CPU and floods
the log, and the supervisor stays up even when every worker has died at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ops.load.spawn import free_port
from tests.helpers.bot import open_policy
from tests.helpers.server import ROOT, isolated_redis_url

pytestmark = pytest.mark.slow


def _died(log_path: Path) -> list[dict[str, object]]:
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        if '"worker_died"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def test_crashing_workers_back_off_and_supervisor_stays(redis_url: str, tmp_path: Path) -> None:
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "REDIS_URL": isolated_redis_url(redis_url), "BOT_HTTP_HOST": "127.0.0.1",
           "BOT_HTTP_PORT": str(free_port()), "BOT_SIP_ENABLED": "0", "BOT_DATA_DIR": str(tmp_path / "data"),
           "BOT_POLICY": str(open_policy(tmp_path / "p.yaml")), "TWILIO_AUTH_TOKEN": "",
           "BOT_ENGINE_FACTORY": "tests.helpers.no_such_engine:make", "PYTHONUNBUFFERED": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "bot.cli", "serve", "--workers", "2"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 150
        died: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            died = _died(log_path)
            if max((int(str(d.get("crashes_in_a_row", 0))) for d in died), default=0) >= 2:
                break
            assert proc.poll() is None, f"supervisor exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        per_slot: dict[object, list[float]] = {}
        for d in died:
            per_slot.setdefault(d["index"], []).append(float(str(d["restart_in_s"])))
        assert any(len(v) >= 2 for v in per_slot.values()), died
        for delays in per_slot.values():
            # first death: replaced at once; quick deaths after it wait, longer each time (1 s, 2 s, ... 30 s)
            assert delays[0] == 0.0, per_slot
            assert all(b > a for a, b in zip(delays, delays[1:])), per_slot
        assert proc.poll() is None  # still supervising: neither a crash loop's end nor an exit
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    assert rc in (0, 3), log_path.read_text()[-3000:]  # stopped on request (a worker's own rc may surface)
