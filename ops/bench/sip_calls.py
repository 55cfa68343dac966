"""Benchmark: N concurrent real-time SIP calls against a SipServer.

    .venv/bin/python ops/bench/sip_calls.py --calls 10 50 100 --hold 20 [--target HOST:PORT] [--srtp]

Without --target it starts a SipServer with an ECHO handler in a child process (so the server's CPU
is measured apart from the simulated callers): every caller plays a 200 ms tone burst every 2 s and
measures when the echoed burst comes back. That "voice-to-voice" figure is the bridge's own
mouth-to-ear delay (jitter buffer + pacing + sockets), i.e. what the SIP transport adds to the bot's
thinking time. With --target (e.g. a running `bot serve`) it reports packet timing, and with
--wav each caller also says one turn after the greeting and the voice-to-voice latency (end of the
caller's speech -> first bot audio packet) is reported.

Prints, per N: echo latency p50/p95, RTP inter-arrival jitter (RFC 3550 estimator) p50/p95 across
calls, late packets (inter-arrival > 40 ms), lost packets (sequence gaps), server CPU % and CPU % per
call, and the server media clock's late/skipped ticks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

BURST_S, PERIOD_S = 0.2, 2.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


async def _serve_echo(port: int) -> None:
    """Child process: SipServer + echo handler; prints clock stats as JSON when stdin closes."""
    from telephony.bridge import AudioIn
    from telephony.sip.config import SipSettings
    from telephony.sip.server import SipServer

    async def echo(bridge) -> None:  # type: ignore[no-untyped-def]
        async for ev in bridge.events():
            if isinstance(ev, AudioIn):
                await bridge.send_audio(ev.pcm)

    settings = SipSettings(allow="127.0.0.0/8", password="", invite_rate=1000, invite_burst=1000, max_calls=1000,
                           rtp_timeout_s=60)
    srv = SipServer("127.0.0.1", port, echo, settings)
    await srv.start()
    print(json.dumps({"ready": srv.port}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    c = srv.clock
    print(json.dumps({"ticks": c.ticks, "late_ticks": c.late_ticks, "skipped_ticks": c.skipped_ticks,
                      "tick_ms_avg": round(1000 * c.tick_cost_s / max(1, c.ticks), 3),
                      "max_lag_ms": round(1000 * c.max_lag_s, 1),
                      "lags_ms": [round(1000 * lag) for _, lag in c.lag_events[:50]]}), flush=True)
    await srv.stop()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _packet_stats(caller: Any) -> dict:
    st = caller.stats
    arr = np.array(st.rx_times[50:])  # skip call set-up
    inter = np.diff(arr) if arr.size > 2 else np.zeros(0)
    j = 0.0  # RFC 3550 interarrival jitter (the sender paces at exactly 20 ms)
    for d in np.abs(inter - 0.02):
        j += (d - j) / 16
    return {"jitter_ms": 1000 * j, "late": int(np.sum(inter > 0.040)), "lost": st.rx_seq_gaps, "rx": st.rx_packets,
            "max_gap_ms": float(inter.max() * 1000) if inter.size else 0.0}


async def _one_call(host: str, port: int, hold_s: float, results: list[dict], start_delay: float,
                    turn: np.ndarray | None, srtp: str | None = None) -> None:
    from telephony.sip.uac import SipCaller, trailing_silence_s

    await asyncio.sleep(start_delay)
    caller = SipCaller(host, port, srtp=srtp)
    await caller.open()
    try:
        if await caller.invite() != 200:
            results.append({"failed": True})
            return
        t0 = time.monotonic()
        lat: list[float] = []
        if turn is not None:
            # Real bot: wait out the greeting, say the turn, time end of speech -> first bot audio.
            await caller.wait_bot_quiet(0.8, 15)
            _, end = await caller.play(turn, "turn")
            end -= trailing_silence_s(turn)  # from the end of the caller's speech
            await caller.wait_bot_quiet(0.8, 15)
            first = next((t for t in caller.stats.voiced_rx if t >= end), None)
            if first is not None:
                lat.append(first - end)
            while time.monotonic() - t0 < hold_s and not caller.ended.is_set():
                await asyncio.sleep(0.5)
        else:
            tone = (8000 * np.sin(2 * np.pi * 700 * np.arange(int(8000 * BURST_S)) / 8000)).astype(np.int16)
            gap = np.zeros(int(8000 * (PERIOD_S - BURST_S)), dtype=np.int16)
            k = 0
            while time.monotonic() - t0 < hold_s and not caller.ended.is_set():
                # The mark fires on the clock tick that sends the burst's first frame: its true send time.
                caller.media.queue_mark(f"b{k}")
                caller.media.queue_audio(np.concatenate([tone, gap]))
                k += 1
                await asyncio.sleep(PERIOD_S)
            voiced = np.array(caller.stats.voiced_rx)
            for b in [caller.mark_times[f"b{i}"] for i in range(k - 1) if f"b{i}" in caller.mark_times]:
                after = voiced[(voiced >= b) & (voiced < b + PERIOD_S - 0.1)]
                if after.size:
                    lat.append(float(after[0] - b))
        await asyncio.sleep(0.5)
        results.append({"latency_ms": [1000 * x for x in lat], **_packet_stats(caller)})
        await caller.bye()
    finally:
        caller.close()


async def _run_level(n: int, hold_s: float, target: tuple[str, int], server_pid: int | None,
                     turn: np.ndarray | None = None, srtp: str | None = None) -> dict:
    results: list[dict] = []
    ramp = min(5.0, n * 0.05)
    cpu0 = _cpu_s(server_pid) if server_pid else 0.0
    me0 = _cpu_s(os.getpid())
    t0 = time.monotonic()
    await asyncio.gather(*[_one_call(target[0], target[1], hold_s, results, ramp * i / n, turn, srtp)
                           for i in range(n)])
    wall = time.monotonic() - t0
    ok = [r for r in results if not r.get("failed")]
    lat = [x for r in ok for x in r["latency_ms"]]
    out = {
        "calls": n, "answered": len(ok), "hold_s": hold_s, "srtp": srtp,
        ("turn_latency_ms" if turn is not None else "echo_latency_ms"): {"p50": _pct(lat, 50), "p95": _pct(lat, 95)},
        "rtp_jitter_ms": {"p50": _pct([r["jitter_ms"] for r in ok], 50), "p95": _pct([r["jitter_ms"] for r in ok], 95)},
        "late_packets": sum(r["late"] for r in ok), "lost_packets": sum(r["lost"] for r in ok),
        "rx_packets": sum(r["rx"] for r in ok), "max_gap_ms": round(max((r["max_gap_ms"] for r in ok), default=0), 1),
        "callers_cpu_pct": round(100 * (_cpu_s(os.getpid()) - me0) / wall, 1),
    }
    if server_pid:
        cpu = 100 * (_cpu_s(server_pid) - cpu0) / wall
        out["server_cpu_pct"] = round(cpu, 1)
        out["server_cpu_pct_per_call"] = round(cpu / max(1, n), 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--hold", type=float, default=20.0, help="seconds each call stays up")
    ap.add_argument("--target", default="", help="HOST:PORT of a running SIP server (default: start an echo server)")
    ap.add_argument("--server-pid", type=int, default=None, help="with --target: PID whose CPU to measure")
    ap.add_argument("--wav", default="", help="with --target: one caller turn; reports end of speech -> first bot audio")
    ap.add_argument("--srtp", action="store_true", help="callers offer SRTP (AES_CM_128_HMAC_SHA1_80): its CPU cost")
    ap.add_argument("--serve-echo", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("BOT_LOG_LEVEL", "WARNING")
    from ops.logs import configure_logging
    configure_logging("WARNING")
    if args.serve_echo is not None:
        asyncio.run(_serve_echo(args.serve_echo))
        return 0
    child = None
    if args.target:
        host, _, port = args.target.rpartition(":")
        target = (host, int(port))
    else:
        child = subprocess.Popen([sys.executable, __file__, "--serve-echo", "0"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
        assert child.stdout
        target = ("127.0.0.1", json.loads(child.stdout.readline())["ready"])
    rows = []
    try:
        for n in args.calls:
            turn = None
            if args.wav:
                from telephony.sip.uac import read_wav_8k
                turn = read_wav_8k(args.wav)
            row = asyncio.run(_run_level(n, args.hold, target, child.pid if child else args.server_pid, turn,
                                         "AES_CM_128_HMAC_SHA1_80" if args.srtp else None))
            if args.target and turn is None:  # a real bot talks on its own schedule: not an echo
                row["echo_latency_ms"] = {"p50": None, "p95": None}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if child:
            assert child.stdin and child.stdout
            child.stdin.close()
            stats = child.stdout.readline().strip()
            child.wait(timeout=30)
            if stats:
                print(json.dumps({"server_clock": json.loads(stats)}), flush=True)
    print(f"{'calls':>5} {'ans':>4} {'lat p50':>9} {'p95':>6} {'jit p50':>8} {'p95':>6} {'late':>5} {'lost':>5} "
          f"{'maxgap':>7} {'srv cpu%':>8} {'%/call':>7}")
    for r in rows:
        lat = r.get("echo_latency_ms") or r.get("turn_latency_ms")
        print(f"{r['calls']:>5} {r['answered']:>4} {lat['p50']!s:>9} {lat['p95']!s:>6} "
              f"{r['rtp_jitter_ms']['p50']!s:>8} {r['rtp_jitter_ms']['p95']!s:>6} {r['late_packets']:>5} "
              f"{r['lost_packets']:>5} {r['max_gap_ms']:>7} {r.get('server_cpu_pct', '-')!s:>8} "
              f"{r.get('server_cpu_pct_per_call', '-')!s:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
