"""Cross-call batching: one asyncio worker per (backend, op) turns concurrent requests into batches.

Requests queue in arrival order. The worker takes the oldest request's length bucket and up to
`max_batch` requests of that bucket, runs the synchronous batch function in its own thread (the event
loop never blocks), and resolves each caller's future. While a batch runs, new requests pile up and
form the next batch, so under load batches grow by themselves. The small wait budget (`wait_ms`) is
only spent when traffic is busy (another request arrived recently); a lone request on an idle worker
runs at once, so batching never makes a quiet call slower than unbatched inference.

The queue is bounded: when it is full `submit` raises EngineOverloaded at once (back-pressure the
conversation turns into an apology + transfer) instead of letting latency grow without limit.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Sequence, TypeVar

from ops.logs import get_logger
from ops.metrics import ENGINE_BATCH_SIZE, ENGINE_INFERENCE, ENGINE_QUEUE, ERRORS

T = TypeVar("T")
R = TypeVar("R")


def log() -> Any:
    """Resolved per use: a module-level bound logger would keep structlog's pre-configuration defaults."""
    return get_logger("engine.batching")


class EngineError(RuntimeError):
    """Any engine failure the conversation should catch (apologise, then transfer)."""


class EngineOverloaded(EngineError):
    """The engine queue is full: back-pressure, try later or transfer."""


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = field(default_factory=lambda: int(os.environ.get("BOT_ENGINE_MAX_BATCH", "32")))
    wait_ms: float = field(default_factory=lambda: float(os.environ.get("BOT_ENGINE_BATCH_WAIT_MS", "5")))
    max_queue: int = field(default_factory=lambda: int(os.environ.get("BOT_ENGINE_MAX_QUEUE", "256")))
    # A request arriving within this window of the previous one means "busy": worth waiting wait_ms.
    busy_window_ms: float = 50.0
    # Adaptive cap: batch sizes (powers of two up to max_batch) are used only while their measured cost
    # per item-second beats smaller ones. On a CPU, where a batch is no cheaper per item, this settles
    # near 1; on a GPU it grows to max_batch. BOT_ENGINE_ADAPTIVE_BATCH=0 always allows max_batch.
    # Worker threads per op pulling batches from the same queue (CPU: one per core helps, GPU: 1).
    workers: int = field(default_factory=lambda: int(os.environ.get("BOT_ENGINE_WORKERS", "1")))
    adaptive: bool = field(default_factory=lambda: os.environ.get("BOT_ENGINE_ADAPTIVE_BATCH", "1") not in ("0", "false", "no"))

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.wait_ms < 0 or self.workers < 1:
            raise ValueError(f"invalid batch config {self}")


@dataclass
class _Request(Generic[T]):
    item: T
    bucket: int
    future: asyncio.Future
    enqueued: float


class BatchScheduler(Generic[T, R]):
    """`await submit(item)` -> the result of `fn([.., item, ..])` for that item.

    fn: synchronous, thread-safe, returns one result per input in order. bucket: item -> length bucket
    (only same-bucket items share a batch, so padding stays small)."""

    def __init__(self, op: str, fn: Callable[[list[T]], Sequence[R]], *, backend: str = "onnx",
                 bucket: Callable[[T], int] | None = None, config: BatchConfig | None = None) -> None:
        self.op = op
        self.fn = fn
        self.backend = backend
        self.bucket = bucket or (lambda _item: 0)
        self.config = config or BatchConfig()
        self._executor = ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix=f"engine-{op}")
        self._pending: deque[_Request[T]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._workers: list[asyncio.Task] = []
        self._last_arrival = 0.0
        self._busy_arrival = False
        self._closed = False
        self.batches = 0  # counters for tests and the benchmark
        self.items = 0
        # Wait the batching itself added per request: time queued while the worker was idle (gathering),
        # as opposed to waiting for a busy worker (capacity). Recent requests only.
        self.added_wait: deque[float] = deque(maxlen=10000)
        self._free_at = 0.0
        self._cost: dict[int, float] = {}  # size class -> EMA of seconds per item-second of audio
        self._best = 1  # adaptive: start at unbatched (lone-call latency first), grow when it pays
        self._rounds = 0

    @property
    def cap(self) -> int:
        """The batch size the cost model currently prefers (max_batch when not adaptive)."""
        return self._best if self.config.adaptive else self.config.max_batch

    def _next_cap(self) -> int:
        """Cap for the next batch: the preferred size, probing one class up (every 8th batch) and one
        down (every 8th, offset) so the costs stay fresh and a faster regime is found again."""
        if not self.config.adaptive:
            return self.config.max_batch
        self._rounds += 1
        if self._rounds % 8 == 0:
            return min(self.config.max_batch, self._best * 2)
        if self._rounds % 8 == 4:
            return max(1, self._best // 2)
        return self._best

    def _learn(self, size: int, elapsed: float, work: float) -> None:
        """EMA of the cost per item-second for this size class; prefer the cheapest class, small ones
        on near-ties (a bigger batch must be clearly cheaper per item to be worth the waiting)."""
        if not self.config.adaptive:
            return
        cls = 1 << (size.bit_length() - 1)  # 1, 2, 4, 8, ...
        per = elapsed / max(work, 1e-9)
        self._cost[cls] = per if cls not in self._cost else 0.7 * self._cost[cls] + 0.3 * per
        self._best = min(self.config.max_batch,
                         min(self._cost, key=lambda c: self._cost[c] * (1 + 0.05 * math.log2(c))))

    @property
    def queued(self) -> int:
        return len(self._pending)

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or a new event loop (tests): start fresh on this one
            for req in self._pending:
                if not req.future.done() and not req.future.get_loop().is_closed():
                    req.future.set_exception(EngineError("engine worker restarted"))
            self._pending.clear()
            self._loop, self._wakeup = loop, asyncio.Event()
            self._workers = []
        self._workers = [w for w in self._workers if not w.done()]
        while len(self._workers) < self.config.workers:
            self._workers.append(loop.create_task(self._run(), name=f"engine-batcher-{self.op}"))

    async def submit(self, item: T) -> R:
        if self._closed:
            raise EngineError(f"engine {self.op} scheduler is closed")
        self._ensure_worker()
        if len(self._pending) >= self.config.max_queue:
            # callers that gave up (timed out, hung up) stay queued until the worker's next pass: they
            # must not count, or a burst of timeouts refuses live calls with a half-empty queue
            self._pending = deque(r for r in self._pending if not r.future.done())
        if len(self._pending) >= self.config.max_queue:
            ERRORS.labels(component="engine", kind="queue_full").inc()
            log().warning("engine queue full", op=self.op, queued=len(self._pending))
            raise EngineOverloaded(f"engine {self.op} queue full ({self.config.max_queue} waiting)")
        now = time.perf_counter()
        self._busy_arrival = (now - self._last_arrival) * 1000 < self.config.busy_window_ms
        self._last_arrival = now
        fut: asyncio.Future = self._loop.create_future()  # type: ignore[union-attr]
        self._pending.append(_Request(item, int(self.bucket(item)), fut, now))
        self._wakeup.set()  # type: ignore[union-attr]
        return await fut

    async def _gather(self, cap: int) -> None:
        """Spend the wait budget (only when busy) for more same-bucket requests to arrive."""
        if len(self._pending) >= cap or self.config.wait_ms <= 0:
            return
        if len(self._pending) == 1 and not self._busy_arrival:
            return  # lone request on an idle worker: run now
        deadline = self._pending[0].enqueued + self.config.wait_ms / 1000
        while len(self._pending) < cap:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._wakeup.clear()  # type: ignore[union-attr]
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)  # type: ignore[union-attr]
            except asyncio.TimeoutError:
                return

    def _take_batch(self, cap: int) -> list[_Request[T]]:
        bucket = self._pending[0].bucket
        batch: list[_Request[T]] = []
        keep: deque[_Request[T]] = deque()
        while self._pending:
            req = self._pending.popleft()
            if req.future.done():  # the caller gave up (hung up, timed out): don't compute it
                continue
            if req.bucket == bucket and len(batch) < cap:
                batch.append(req)
            else:
                keep.append(req)
        self._pending = keep
        return batch

    async def _run(self) -> None:
        while not self._closed:
            if not self._pending:
                self._wakeup.clear()  # type: ignore[union-attr]
                await self._wakeup.wait()  # type: ignore[union-attr]
                continue
            cap = self._next_cap()
            await self._gather(cap)
            if not self._pending:
                continue
            batch = self._take_batch(cap)
            if batch:
                await self._execute(batch)

    async def _execute(self, batch: list[_Request[T]]) -> None:
        start = time.perf_counter()
        for req in batch:
            ENGINE_QUEUE.labels(op=self.op).observe(start - req.enqueued)
            self.added_wait.append(max(0.0, start - max(req.enqueued, self._free_at)))
        ENGINE_BATCH_SIZE.labels(op=self.op).observe(len(batch))
        items = [req.item for req in batch]
        try:
            results = await self._loop.run_in_executor(self._executor, self.fn, items)  # type: ignore[union-attr]
            if len(results) != len(batch):
                raise EngineError(f"{self.op} returned {len(results)} results for {len(batch)} inputs")
        except Exception as exc:  # noqa: BLE001 - every failure is delivered to the waiting calls
            if len(batch) > 1:  # isolate: one bad input must not fail the other calls in its batch
                for req in batch:
                    await self._execute([req])
                return
            self._free_at = time.perf_counter()
            ERRORS.labels(component="engine", kind=f"{self.op}_failed").inc()
            log().error("engine batch failed", op=self.op, backend=self.backend, size=len(batch), error=repr(exc))
            err = exc if isinstance(exc, EngineError) else EngineError(f"{self.op} failed: {exc!r}")
            if err is not exc:
                err.__cause__ = exc
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(err)
            return
        self._free_at = time.perf_counter()
        elapsed = self._free_at - start
        self._learn(len(batch), elapsed, sum(max(1, r.bucket) for r in batch))
        self.batches += 1
        self.items += len(batch)
        for req, res in zip(batch, results):
            ENGINE_INFERENCE.labels(op=self.op, backend=self.backend).observe(elapsed)
            if not req.future.done():
                req.future.set_result(res)

    async def close(self) -> None:
        """Stop the worker and fail whatever still waits (the process is shutting down)."""
        self._closed = True
        for worker in self._workers:
            if not worker.done():
                worker.cancel()
                try:
                    await worker
                except (asyncio.CancelledError, RuntimeError):
                    pass
        for req in self._pending:
            if not req.future.done():
                req.future.set_exception(EngineError("engine closed"))
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def run_sync(self, items: list[T]) -> Sequence[R]:
        """Unbatched reference path (benchmarks, parity tests): the same fn on the caller's thread."""
        return self.fn(items)


def stats(scheduler: BatchScheduler[Any, Any]) -> dict[str, float]:
    return {"batches": scheduler.batches, "items": scheduler.items,
            "mean_batch": scheduler.items / scheduler.batches if scheduler.batches else 0.0}
