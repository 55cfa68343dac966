"""Policy publish -> every worker switched: p50/p95 over N publishes, against a real redis-server.

Each "worker" is a separate process running a PolicyWatcher on its own Redis connection (as
`bot serve` workers do); the publisher measures publish time (validate + Lua script) and each
worker reports when it swapped in the new Policy (same host clock).

    nice -n 10 .venv/bin/python -m ops.bench.admin_policy_switch [--workers 2] [--n 30]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from policies.store import DEFAULT_POLICY_PATH, Actor, PolicyStore, PolicyWatcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _worker(url: str, n: int, out: "mp.Queue[tuple[int, float]]", ready: "mp.Event") -> None:
    async def run() -> None:
        r = aioredis.from_url(url, decode_responses=True)
        done = asyncio.Event()
        seen = 0

        async def on_change(version: int, _policy: object, _text: str) -> None:
            nonlocal seen
            out.put((version, time.time()))
            seen += 1
            if seen > n:
                done.set()

        w = PolicyWatcher(r, poll_s=1.0, on_change=on_change)
        await w.start()
        ready.set()
        try:
            await asyncio.wait_for(done.wait(), timeout=60 + n * 5)
        finally:
            await w.stop()
            await r.aclose()

    asyncio.run(run())


async def _publish(url: str, n: int, gap_s: float) -> dict[int, float]:
    r = aioredis.from_url(url, decode_responses=True)
    store = PolicyStore(r)
    base = Path(DEFAULT_POLICY_PATH).read_text()
    published: dict[int, float] = {}
    durations = []
    for i in range(n):
        cur = await store.current_version()
        # a different global accept each time (whatever the shipped value is), so every publish is a new version
        text = re.sub(r"^  accept: [0-9.]+", f"  accept: {0.80 + (i % 10) / 100:.2f}", base, count=1, flags=re.M)
        t0 = time.time()
        v = await store.publish(text, cur, Actor("bench", "publisher"))
        published[v] = time.time()  # the moment the script committed (upper bound)
        durations.append((published[v] - t0) * 1000)
        await asyncio.sleep(gap_s)
    print(f"publish (validate + script): p50 {_pct(durations, .5):.1f} ms  p95 {_pct(durations, .95):.1f} ms")
    await r.aclose()
    return published


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n", type=int, default=30, help="publishes")
    ap.add_argument("--gap", type=float, default=0.2, help="seconds between publishes")
    args = ap.parse_args()
    exe = shutil.which("redis-server")
    assert exe, "redis-server is required"
    port = _free_port()
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", d, "--save", "",
                                 "--appendonly", "no"], stdout=subprocess.DEVNULL)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            asyncio.run(_seed(url))
            ctx = mp.get_context("spawn")
            q: mp.Queue[tuple[int, float]] = ctx.Queue()
            procs, readies = [], []
            for _ in range(args.workers):
                ev = ctx.Event()
                p = ctx.Process(target=_worker, args=(url, args.n, q, ev))
                p.start()
                procs.append(p)
                readies.append(ev)
            for ev in readies:
                ev.wait(60)
            published = asyncio.run(_publish(url, args.n, args.gap))
            lags: list[float] = []
            deadline = time.time() + 10
            got = 0
            while got < args.workers * (args.n + 1) and time.time() < deadline:
                try:
                    v, t = q.get(timeout=1)
                except Exception:  # noqa: BLE001 - queue.Empty: keep waiting until the deadline
                    continue
                got += 1
                if v in published:
                    lags.append((t - published[v]) * 1000)
            for p in procs:
                p.join(10)
            print(f"workers: {args.workers}, publishes: {args.n}, switches seen: {len(lags)}")
            print(f"publish -> worker switched: p50 {_pct(lags, .5):.1f} ms  p95 {_pct(lags, .95):.1f} ms  "
                  f"max {max(lags):.1f} ms  mean {statistics.mean(lags):.1f} ms")
        finally:
            proc.terminate()
            proc.wait(10)


async def _seed(url: str) -> None:
    r = aioredis.from_url(url, decode_responses=True)
    await PolicyStore(r).ensure_seeded()
    await r.aclose()


if __name__ == "__main__":
    main()
