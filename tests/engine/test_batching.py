"""The cross-call batching scheduler, with a deterministic CPU batch function (numpy work per item)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from engine.batching import BatchConfig, BatchScheduler, EngineError, EngineOverloaded
from ops.metrics import ENGINE_BATCH_SIZE, ERRORS


class Spectral:
    """Per item: the strongest FFT bin of a signal (real numpy work), or ValueError for NaN input.
    Records each batch it was called with, and can hold batches back to build up a queue."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[np.ndarray]) -> list[int]:
        self.gate.wait(10)
        self.batches.append([len(x) for x in items])
        if any(np.isnan(x).any() for x in items):
            raise ValueError("NaN in input")
        return [int(np.argmax(np.abs(np.fft.rfft(x)))) for x in items]


def sig(freq: int, n: int = 800) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(n) / n)


def hist_count(op: str) -> float:
    return sum(s.value for m in ENGINE_BATCH_SIZE.collect() for s in m.samples
               if s.name.endswith("_count") and s.labels.get("op") == op)


async def test_concurrent_requests_batch_and_resolve_each_caller() -> None:
    fn = Spectral()
    sched = BatchScheduler("t_batch", fn, config=BatchConfig(max_batch=8, wait_ms=20, max_queue=100, adaptive=False))
    try:
        fn.gate.clear()  # the first request occupies the worker; the rest queue up behind it
        first = asyncio.ensure_future(sched.submit(sig(3)))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(sched.submit(sig(f))) for f in range(4, 24)]
        await asyncio.sleep(0.05)
        fn.gate.set()
        results = await asyncio.gather(first, *rest)
    finally:
        await sched.close()
    assert results == list(range(3, 24))  # each caller got its own answer, equal to the unbatched one
    assert results == [fn([sig(f)])[0] for f in range(3, 24)]
    assert max(len(b) for b in fn.batches) == 8  # batched, never beyond max_batch
    assert sched.items == 21 and sched.batches < 21
    assert hist_count("t_batch") == sched.batches


async def test_only_same_length_bucket_shares_a_batch() -> None:
    fn = Spectral()
    sched = BatchScheduler("t_bucket", fn, bucket=lambda x: len(x) // 1000, config=BatchConfig(max_batch=32, wait_ms=20, adaptive=False))
    try:
        fn.gate.clear()
        blocker = asyncio.ensure_future(sched.submit(sig(1)))
        await asyncio.sleep(0.05)
        futs = [asyncio.ensure_future(sched.submit(sig(5, n))) for n in (800, 2500, 900, 2600, 700)]
        await asyncio.sleep(0.05)
        fn.gate.set()
        assert await asyncio.gather(blocker, *futs) == [1, 5, 5, 5, 5, 5]
    finally:
        await sched.close()
    for batch in fn.batches:
        assert len({n // 1000 for n in batch}) == 1
    assert sorted(map(sorted, fn.batches[1:])) == [[700, 800, 900], [2500, 2600]]


async def test_lone_request_skips_the_wait_budget() -> None:
    fn = Spectral()
    sched = BatchScheduler("t_lone", fn, config=BatchConfig(max_batch=8, wait_ms=300))
    try:
        await sched.submit(sig(2))  # warm the worker thread
        await asyncio.sleep(0.2)  # idle: the next request is not part of a burst
        t0 = time.perf_counter()
        assert await sched.submit(sig(7)) == 7
        assert time.perf_counter() - t0 < 0.25  # did not sit out the 300 ms budget
    finally:
        await sched.close()


async def test_back_pressure_raises_and_counts() -> None:
    fn = Spectral()
    sched = BatchScheduler("t_full", fn, config=BatchConfig(max_batch=2, wait_ms=0, max_queue=3))
    before = ERRORS.labels(component="engine", kind="queue_full")._value.get()
    try:
        fn.gate.clear()
        running = asyncio.ensure_future(sched.submit(sig(1)))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(sched.submit(sig(f))) for f in (2, 3, 4)]
        await asyncio.sleep(0)
        with pytest.raises(EngineOverloaded, match="queue full"):
            await sched.submit(sig(5))
        fn.gate.set()
        assert await asyncio.gather(running, *queued) == [1, 2, 3, 4]  # the admitted ones still finish
    finally:
        await sched.close()
    assert ERRORS.labels(component="engine", kind="queue_full")._value.get() == before + 1


async def test_a_bad_item_fails_alone_not_its_batch_mates() -> None:
    fn = Spectral()
    sched = BatchScheduler("t_iso", fn, config=BatchConfig(max_batch=8, wait_ms=20, adaptive=False))
    bad = np.full(800, np.nan)
    try:
        fn.gate.clear()
        blocker = asyncio.ensure_future(sched.submit(sig(1)))
        await asyncio.sleep(0.05)
        futs = [asyncio.ensure_future(sched.submit(x)) for x in (sig(2), bad, sig(9))]
        await asyncio.sleep(0.05)
        fn.gate.set()
        results = await asyncio.gather(blocker, *futs, return_exceptions=True)
    finally:
        await sched.close()
    assert results[0] == 1 and results[1] == 2 and results[3] == 9
    assert isinstance(results[2], EngineError) and isinstance(results[2].__cause__, ValueError)


async def test_cancelled_caller_is_skipped_and_closed_scheduler_refuses() -> None:
    fn = Spectral()
    sched = BatchScheduler("t_cancel", fn, config=BatchConfig(max_batch=8, wait_ms=0))
    fn.gate.clear()
    blocker = asyncio.ensure_future(sched.submit(sig(1)))
    await asyncio.sleep(0.05)
    gone = asyncio.ensure_future(sched.submit(sig(2)))
    stays = asyncio.ensure_future(sched.submit(sig(3)))
    await asyncio.sleep(0)
    gone.cancel()  # the caller hung up
    fn.gate.set()
    assert await blocker == 1 and await stays == 3
    assert fn.batches == [[800], [800]]  # sig(2) was never computed
    await sched.close()
    with pytest.raises(EngineError, match="closed"):
        await sched.submit(sig(4))


def test_invalid_config_is_rejected() -> None:
    with pytest.raises(ValueError):
        BatchConfig(max_batch=0)


@pytest.mark.parametrize("per_batch,expect_big", [(True, True), (False, False)])
async def test_adaptive_cap_follows_measured_cost(per_batch: bool, expect_big: bool) -> None:
    """Where a batch costs the same as one item (GPU-like) the cap grows to max_batch; where cost is per
    item (CPU-like) it stays small, so callers are not held back for batches that buy nothing.
    (Sleep stands in for device time: the cost model is what is under test, and it spares the CPU.)"""

    def fn(items: list[int]) -> list[int]:
        # per_batch: GPU-like, one launch for the whole batch. Else CPU-like as measured on understand-v1/v2:
        # per-item cost grows with the batch (7.8 ms alone, 10.5 ms/item at 16).
        time.sleep(0.01 if per_batch else 0.004 * len(items) * (1 + 0.05 * len(items)))
        return [i * 2 for i in items]

    sched = BatchScheduler("t_adapt", fn, config=BatchConfig(max_batch=16, wait_ms=2, adaptive=True))
    try:
        for _round in range(12):
            assert await asyncio.gather(*(sched.submit(i) for i in range(32))) == [i * 2 for i in range(32)]
    finally:
        await sched.close()
    assert (sched.cap == 16) if expect_big else (sched.cap <= 4)


async def test_callers_that_gave_up_do_not_fill_the_queue() -> None:
    """Timed-out callers stay queued until the worker's next pass; a full queue of them must not refuse a
    live call (it did: EngineOverloaded, i.e. an apology and a transfer, with nobody actually waiting)."""
    fn = Spectral()
    sched = BatchScheduler("t_stale", fn, config=BatchConfig(max_batch=1, wait_ms=0, max_queue=3))
    before = ERRORS.labels(component="engine", kind="queue_full")._value.get()
    try:
        fn.gate.clear()
        blocker = asyncio.ensure_future(sched.submit(sig(1)))
        await asyncio.sleep(0.05)  # the worker is busy with it
        gave_up = [asyncio.ensure_future(asyncio.wait_for(sched.submit(sig(f)), 0.01)) for f in (2, 3, 4)]
        for fut in gave_up:
            with pytest.raises(asyncio.TimeoutError):
                await fut
        live = asyncio.ensure_future(sched.submit(sig(5)))
        await asyncio.sleep(0)
        fn.gate.set()
        assert await blocker == 1 and await live == 5
    finally:
        await sched.close()
    assert fn.batches == [[800], [800]]  # the abandoned requests were never computed
    assert ERRORS.labels(component="engine", kind="queue_full")._value.get() == before
