"""decide() and `bot policy tune` replay speed: p50/p95 per decision, and one tune over N synthetic turns.

    nice -n 10 .venv/bin/python -m ops.bench.bench_policy [--n 20000]
"""

from __future__ import annotations

import argparse
import random
import time

from engine.types import Understanding
from policies.decide import CallStart, CallState, NoInput, step
from policies.replay import Record
from policies.schema import load_policy
from policies.tune import tune


def _random_understanding(rng: random.Random, intents: list[str]) -> Understanding:
    top, second = rng.choice(intents), rng.choice(intents)
    conf = rng.random()
    return Understanding(top, conf, [(top, conf), (second, (1 - conf) * rng.random())],
                         caller_state={"frustration": rng.random() * 0.8})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000, help="decisions to time")
    ap.add_argument("--tune-n", type=int, default=1500, help="evaluation turns for the tune timing")
    args = ap.parse_args()
    policy = load_policy()
    rng = random.Random(0)
    intents = list(policy.intents)
    times = []
    state = step(policy, CallState(), CallStart())[1]
    for i in range(args.n):
        inp = NoInput() if i % 17 == 0 else _random_understanding(rng, intents)
        t0 = time.perf_counter()
        _, state = step(policy, state, inp)
        times.append(time.perf_counter() - t0)
        if state.ended:
            state = step(policy, CallState(), CallStart())[1]
    times.sort()
    p50, p95 = times[len(times) // 2] * 1e6, times[int(len(times) * 0.95)] * 1e6
    print(f"decide+next_state: n={args.n} p50={p50:.1f} us p95={p95:.1f} us")
    recs = [Record(f"{i}.wav", rng.choice(intents), _random_understanding(rng, intents)) for i in range(args.tune_n)]
    t0 = time.perf_counter()
    result = tune(policy, recs)
    print(f"tune: {args.tune_n} turns x {len(result['table'])} grid points in {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
