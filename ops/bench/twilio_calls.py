"""Benchmark: N concurrent simulated Twilio calls against `bot serve`.

    python -m ops.bench.twilio_calls --spawn --workers 2 --calls 1 10 50
    python -m ops.bench.twilio_calls --url http://127.0.0.1:8080 --redis-url redis://... --calls 10

Each call: webhook -> stream -> greeting -> one caller turn (a WAV, or --text through espeak-ng and
a phone channel) -> the bot's reply -> hang up. Prints, per N: greeting latency (stream start ->
first bot audio at the caller), voice-to-voice at the caller (end of caller audio -> first reply
audio), the end-of-turn silence the bot waited (from the call events), the server's own latency
(turn complete -> first reply frame sent), calls held (greeted and answered), and the server's CPU
per call-second. p50/p95 throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def pct(xs: list[float], q: float) -> float | None:
    return None if not xs else round(float(np.percentile(np.asarray(xs, dtype=float), q)), 1)


def synth_caller(text: str) -> np.ndarray:
    sys.path.insert(0, str(ROOT))
    from tests.helpers.audio import synth

    return synth(text)


def cpu_seconds(pids: list[int]) -> float:
    """user+system CPU of these processes and their children (workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            todo += [int(k) for k in kids]
        except (OSError, IndexError, ValueError):
            pass
    return total


async def one_call(url: str, token: str, pcm: np.ndarray, redis_url: str | None, start_delay: float,
                   hold_s: float) -> dict[str, Any]:
    from bot.simulator import TwilioCaller, fetch_call

    await asyncio.sleep(start_delay)
    caller = TwilioCaller(url, token)
    out: dict[str, Any] = {"ok": False}
    try:
        await caller.connect()
        greeted = await caller.wait_bot_quiet(quiet_s=0.4, timeout_s=30)
        out["greeting_ms"] = caller.result.greeting_ms
        if greeted:
            turn = await caller.say(pcm, wait_reply_s=15, quiet_s=0.5)
            out["v2v_ms"] = turn.v2v_ms
            out["ok"] = turn.v2v_ms is not None
        if hold_s > 0:
            await asyncio.sleep(hold_s)
        await caller.hangup()
    except Exception as exc:  # noqa: BLE001 - a failed call is a data point, not a crash
        out["error"] = repr(exc)[:200]
        await caller.close()
    out["call_s"] = time.monotonic() - caller._t0 if caller._t0 else 0.0
    if redis_url:
        await asyncio.sleep(0.2)
        rec = await fetch_call(url, caller.call_sid, redis_url)
        for e in (rec or {}).get("events", []):
            if e["type"] == "turn" and "eot_wait_ms" not in out:
                out["eot_wait_ms"] = e.get("eot_wait_ms")
                out["understand_ms"] = e.get("understand_ms")
                out["action"] = (e.get("decision") or {}).get("action")
                out["intent"] = e.get("intent")
            if e["type"] == "first_audio" and e.get("turn") == 1 and "server_ms" not in out:
                out["server_ms"] = e.get("latency_ms")
    return out


async def run_level(n: int, url: str, token: str, pcm: np.ndarray, redis_url: str | None, ramp_s: float,
                    server_pids: list[int]) -> dict[str, Any]:
    cpu0, t0 = cpu_seconds(server_pids), time.monotonic()
    # stagger call starts over the ramp (real traffic does not arrive in one instant)
    res = await asyncio.gather(*[one_call(url, token, pcm, redis_url, ramp_s * i / max(1, n), 0.0) for i in range(n)])
    cpu = cpu_seconds(server_pids) - cpu0 if server_pids else None
    for r in res:  # what the caller waited beyond the end-of-turn silence the bot chose to wait
        if r.get("v2v_ms") is not None and r.get("eot_wait_ms") is not None:
            r["v2v_minus_eot"] = r["v2v_ms"] - r["eot_wait_ms"]
    call_s = sum(r.get("call_s", 0) for r in res)

    def col(k: str) -> list[float]:
        return [r[k] for r in res if r.get(k) is not None]

    out = {
        "calls": n, "held": sum(1 for r in res if r["ok"]), "wall_s": round(time.monotonic() - t0, 1),
        "greeting_ms": {"p50": pct(col("greeting_ms"), 50), "p95": pct(col("greeting_ms"), 95)},
        "v2v_at_caller_ms": {"p50": pct(col("v2v_ms"), 50), "p95": pct(col("v2v_ms"), 95)},
        "eot_wait_ms": {"p50": pct(col("eot_wait_ms"), 50), "p95": pct(col("eot_wait_ms"), 95)},
        "v2v_server_ms": {"p50": pct(col("server_ms"), 50), "p95": pct(col("server_ms"), 95)},
        "v2v_caller_minus_eot_ms": {"p50": pct(col("v2v_minus_eot"), 50), "p95": pct(col("v2v_minus_eot"), 95)},
        "understand_ms": {"p50": pct(col("understand_ms"), 50), "p95": pct(col("understand_ms"), 95)},
        "actions": sorted({str(r.get("action")) for r in res}),
        "errors": [r["error"] for r in res if "error" in r][:3],
    }
    if cpu is not None and call_s > 0:
        out["server_cpu_ms_per_call_s"] = round(cpu * 1000 / call_s, 2)
        out["server_cpu_s"] = round(cpu, 1)
    return out


def spawn(workers: int, port: int, redis_url: str, env_extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "BOT_HTTP_PORT": str(port), "BOT_HTTP_HOST": "127.0.0.1", "BOT_SIP_ENABLED": "0",
           "REDIS_URL": redis_url, "BOT_WORKERS": str(workers), "BOT_LOG_LEVEL": "WARNING", **env_extra}
    env.pop("TWILIO_AUTH_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tempfile.gettempdir() + "/bench-serve.log", "wb"))
    deadline = time.monotonic() + 180
    ready: set[str] = set()
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
            if r.status_code == 200:
                ready.add(r.json()["worker"])
                if len(ready) >= workers:
                    return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("bot serve exited; see bench-serve.log")
        time.sleep(0.2)
    raise RuntimeError("bot serve did not become ready")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--redis-url", default=os.environ.get("REDIS_URL", ""))
    ap.add_argument("--token", default=os.environ.get("TWILIO_AUTH_TOKEN", ""))
    ap.add_argument("--calls", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--wav", default=None, help="caller turn (default: --text synthesized)")
    ap.add_argument("--text", default="I want to pay my bill")
    ap.add_argument("--ramp-s", type=float, default=3.0)
    ap.add_argument("--spawn", action="store_true", help="start `bot serve` (needs --redis-url or a redis-server)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--server-pid", type=int, nargs="*", default=[])
    ap.add_argument("--policy", default="", help="BOT_POLICY for --spawn (e.g. one with always-open queues)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from bot.simulator import load_wav_8k

    pcm = load_wav_8k(args.wav) if args.wav else synth_caller(args.text)
    proc = None
    embedded = None
    pids = list(args.server_pid)
    if args.spawn:
        if not args.redis_url:
            from bot.redis_embedded import EmbeddedRedis

            embedded = EmbeddedRedis(Path(tempfile.mkdtemp()))
            args.redis_url = embedded.start()
        from tests.helpers.server import free_port

        port = free_port()
        args.url = f"http://127.0.0.1:{port}"
        proc = spawn(args.workers, port, args.redis_url, {"BOT_POLICY": args.policy} if args.policy else {})
        pids = [proc.pid]
    results = []
    try:
        for n in args.calls:
            r = asyncio.run(run_level(n, args.url, args.token, pcm, args.redis_url or None, args.ramp_s, pids))
            results.append(r)
            if not args.json:
                print(f"N={n:3d} held={r['held']:3d}  greeting p50/p95={r['greeting_ms']['p50']}/{r['greeting_ms']['p95']} ms  "
                      f"v2v(server) p50/p95={r['v2v_server_ms']['p50']}/{r['v2v_server_ms']['p95']} ms  "
                      f"v2v(caller) p50/p95={r['v2v_at_caller_ms']['p50']}/{r['v2v_at_caller_ms']['p95']} ms  "
                      f"eot wait p50/p95={r['eot_wait_ms']['p50']}/{r['eot_wait_ms']['p95']} ms  "
                      f"v2v(caller)-eot p50/p95={r['v2v_caller_minus_eot_ms']['p50']}/{r['v2v_caller_minus_eot_ms']['p95']} ms  "
                      f"cpu/call-s={r.get('server_cpu_ms_per_call_s')} ms", flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        if embedded is not None:
            embedded.stop()
    print(json.dumps({"levels": results, "workers": args.workers if args.spawn else None}, indent=None if not args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
