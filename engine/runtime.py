"""engine.runtime.Engine: the async facade the conversation uses (engine.interface.SpeechEngine).

Every model call goes through a BatchScheduler (one worker thread per op), so the event loop never
blocks and concurrent calls share batches. Failures surface as EngineError subclasses, which the
conversation catches (apologise, transfer). BOT_ENGINE_FAULT=understand|end_of_turn|speak|all makes the
matching calls raise EngineFault (chaos tests); it is read on every call so it can be flipped live.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import Any, AsyncIterator, Protocol

import numpy as np

from engine.batching import BatchConfig, BatchScheduler, EngineError, EngineOverloaded
from engine.types import SAMPLE_RATE, SpeechStyle, Understanding
from engine.voice import Voice, VoiceError, clean_text, load_renderer, split_chunks
from ops.logs import get_logger
from ops.metrics import ERRORS



def log() -> Any:
    """Resolved per use: a module-level bound logger would keep structlog's pre-configuration defaults."""
    return get_logger("engine.runtime")

__all__ = ["Engine", "EngineError", "EngineOverloaded", "EngineFault", "EngineUnavailable", "EngineInputError"]

MAX_SECONDS = 60.0  # longer input is refused here; the model itself only looks at the last 8 s


# ~1-3 s clauses of ~16-48 KB each: about 6 MB at most
def _clause_cache_size() -> int:
    try:  # a bad value is refused with a clear line by bot.config at start; importing must not fail on it
        return max(0, int(os.environ.get("BOT_VOICE_CLAUSE_CACHE", "128")))
    except ValueError:
        return 128


CLAUSE_CACHE_SIZE = _clause_cache_size()


class EngineFault(EngineError):
    """Raised on purpose by the BOT_ENGINE_FAULT hook."""


class EngineUnavailable(EngineError):
    """No understanding model is installed/loadable (speak still works)."""


class EngineInputError(EngineError, ValueError):
    """The audio or text handed to the engine is unusable (wrong type, dtype, shape, empty, too long)."""


class BatchModel(Protocol):
    def understand_batch(self, pcms: list[np.ndarray]) -> list[Understanding]: ...

    def end_of_turn_batch(self, pcms: list[np.ndarray]) -> list[float]: ...


def length_bucket(pcm: np.ndarray) -> int:
    """Whole seconds, rounded up, capped at 8 (the model reads at most the last 8 s)."""
    return min(8, max(1, math.ceil(len(pcm) / SAMPLE_RATE)))


def check_pcm(pcm: Any) -> np.ndarray:
    """8 kHz mono int16, 1-D (or N x 1), non-empty, at most MAX_SECONDS: else EngineInputError."""
    if not isinstance(pcm, np.ndarray):
        raise EngineInputError(f"audio must be a numpy int16 array, got {type(pcm).__name__}")
    if pcm.ndim == 2 and 1 in pcm.shape:
        pcm = pcm.reshape(-1)
    if pcm.ndim != 1:
        raise EngineInputError(f"audio must be mono 1-D, got shape {pcm.shape}")
    if pcm.dtype != np.int16:
        raise EngineInputError(f"audio must be int16 PCM, got dtype {pcm.dtype}")
    if pcm.size == 0:
        raise EngineInputError("audio is empty")
    if pcm.size > MAX_SECONDS * SAMPLE_RATE:
        raise EngineInputError(f"audio too long ({pcm.size / SAMPLE_RATE:.1f} s > {MAX_SECONDS:.0f} s)")
    return pcm


def _load_understanding(model_dir: str | None, backend: str, threads: int) -> BatchModel:
    try:
        from engine.understanding import UnderstandingModel  # lands with the trained model
    except ImportError as exc:
        raise EngineUnavailable(f"engine.understanding is not installed: {exc}") from exc
    params = inspect.signature(UnderstandingModel.load).parameters
    kwargs: dict[str, Any] = {}
    if "threads" in params:
        kwargs["threads"] = threads
    if "backend" in params:
        kwargs["backend"] = backend
    try:
        model = UnderstandingModel.load(model_dir, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise EngineUnavailable(f"understanding model failed to load: {exc}") from exc
    from engine.backends import attach_backend  # swaps the model's sessions when a GPU backend is chosen

    return attach_backend(model, backend, threads)


class _IdleRenderer:
    """Renders prompts nobody is waiting for (pre-rendering after the worker went ready) on one daemon thread
    at the lowest CPU priority, outside the speak scheduler: a caller's speech never queues behind it, and
    on a busy box the kernel gives the CPU to the call threads first. Daemon, so an engine never closed
    cannot keep the process alive; close() stops it and waits for the render in progress."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn
        self._jobs: queue.SimpleQueue[tuple[Future, tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, *args: Any) -> "asyncio.Future[Any]":
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="engine-speak-idle", daemon=True)
                self._thread.start()
        fut: Future = Future()
        self._jobs.put((fut, args))
        return asyncio.wrap_future(fut)

    def _run(self) -> None:
        try:  # Linux: nice is per thread; espeak-ng children forked from here inherit it
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError) as exc:
            log().info("idle renderer keeps normal priority", error=repr(exc))
        while (job := self._jobs.get()) is not None:
            fut, args = job
            if not fut.set_running_or_notify_cancel():
                continue  # its awaiter was cancelled (shutdown, a newer policy)
            try:
                fut.set_result(self._fn(*args))
            except BaseException as exc:  # noqa: BLE001 - delivered to the awaiting coroutine
                fut.set_exception(exc)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop after the render in progress, waiting for it (bounded): onnxruntime aborts the whole process
        (SIGABRT) when the interpreter exits under a session still running on a daemon thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join(timeout_s)


class Engine:
    """Async speech engine. Build with Engine.load(); share one per process across all calls."""

    def __init__(self, model: BatchModel | None, voice: Voice | Future, *, backend: str = "onnx",
                 config: BatchConfig | None = None, unavailable_reason: str = "") -> None:
        """voice: a Voice, or a Future of one still loading (speak waits for it; understand does not)."""
        self.model = model
        if isinstance(voice, Voice):
            self._voice: Future = Future()
            self._voice.set_result(voice)
        else:
            self._voice = voice
        self.backend = backend
        self.config = config or BatchConfig()
        self.fault: str | None = None  # overrides BOT_ENGINE_FAULT when set (tests)
        self._unavailable = unavailable_reason
        self.load_seconds = 0.0
        self._understand = BatchScheduler("understand", self._understand_batch, backend=backend,
                                          bucket=length_bucket, config=self.config)
        self._eot = BatchScheduler("end_of_turn", self._eot_batch, backend=backend, bucket=length_bucket,
                                   config=self.config)
        # VITS output lengths are not exposed per batch item, so speech renders one item at a time (its
        # own worker, so a long sentence never delays understanding).
        speak_cfg = BatchConfig(max_batch=1, wait_ms=0, max_queue=self.config.max_queue,
                                workers=max(1, int(os.environ.get("BOT_VOICE_WORKERS", "1"))))
        self._speak = BatchScheduler("speak", self._speak_batch, backend="voice-cpu", config=speak_cfg)
        self._idle = _IdleRenderer(self._render_idle)
        # clauses of dynamic sentences that carry no digits ("That's a payment of", ", is that right?"): the
        # same template words start every read-back, so the caller's wait for first audio is the render only
        # the first time. Memory only, per worker; clauses with digits (amounts, account numbers) never kept.
        self._clauses: OrderedDict[str, np.ndarray] = OrderedDict()
        self.clause_cache_size = CLAUSE_CACHE_SIZE

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, model_dir: str | None = None, backend: str | None = None, threads: int | None = None, *,
             model: BatchModel | None = None, voice: Voice | str | None = None, config: BatchConfig | None = None,
             cache_dir: Path | str | None = "") -> "Engine":
        """Load the understanding model; the voice (≈1.3 s, a 63 MB VITS graph) keeps loading on a
        background thread and speak() waits for it, so the engine is usable for understanding at once.
        `await engine.wait_ready()` (or `engine.ready`) before taking calls to have both.

        model: an already-built batch model (benchmarks/tests); default engine.understanding.
        voice: a Voice, or "piper" | "espeak" (env BOT_VOICE, default piper with espeak fallback).
        cache_dir: on-disk prompt cache; "" = $BOT_DATA_DIR/voice-cache unless BOT_VOICE_DISK_CACHE=0;
        None = memory only."""
        t0 = time.perf_counter()
        backend = (backend or os.environ.get("BOT_ENGINE_BACKEND", "onnx")).lower()
        threads = int(threads or os.environ.get("BOT_ENGINE_THREADS", "1"))
        if cache_dir == "":
            disk = os.environ.get("BOT_VOICE_DISK_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")
            cache_dir = Path(os.environ.get("BOT_DATA_DIR", "./var")) / "voice-cache" if disk else None
        voice_future: Future = Future()

        def _voice() -> None:
            t_voice = time.perf_counter()
            try:
                renderer = load_renderer(str(voice or os.environ.get("BOT_VOICE", "piper")),
                                         int(os.environ.get("BOT_VOICE_THREADS", "1")),
                                         int(os.environ.get("BOT_VOICE_BURST_THREADS", "2")))
                voice_future.set_result(Voice(renderer, int(os.environ.get("BOT_VOICE_CACHE_SIZE", "256")),
                                              Path(cache_dir) if cache_dir else None))
                log().info("voice loaded", voice=renderer.name, seconds=round(time.perf_counter() - t_voice, 3))
            except Exception as exc:  # noqa: BLE001 - delivered to speak() callers as EngineError
                ERRORS.labels(component="voice", kind="load_failed").inc()
                log().error("voice failed to load", error=repr(exc))
                voice_future.set_exception(EngineError(f"voice failed to load: {exc!r}"))

        if isinstance(voice, Voice):
            voice_future.set_result(voice)
        else:
            threading.Thread(target=_voice, name="engine-voice-load", daemon=True).start()
        reason = ""
        backend_name = backend
        if model is None:
            try:
                model = _load_understanding(model_dir, backend, threads)
                backend_name = getattr(model, "backend_name", "onnx")
            except EngineUnavailable as exc:
                reason = str(exc)
                ERRORS.labels(component="engine", kind="model_unavailable").inc()
                log().warning("understanding model unavailable; understand() will raise", reason=reason)
        engine = cls(model, voice_future, backend=backend_name, config=config, unavailable_reason=reason)
        engine.load_seconds = time.perf_counter() - t0
        log().info("engine loaded", backend=backend_name, threads=threads, seconds=round(engine.load_seconds, 3),
                   understanding=model is not None, voice_ready=voice_future.done())
        return engine

    # ---- sync batch functions (worker threads) ------------------------------------------------
    def _require_model(self) -> BatchModel:
        if self.model is None:
            raise EngineUnavailable(self._unavailable or "no understanding model loaded")
        return self.model

    def _understand_batch(self, pcms: list[np.ndarray]) -> list[Understanding]:
        return list(self._require_model().understand_batch(pcms))

    def _eot_batch(self, pcms: list[np.ndarray]) -> list[float]:
        return [float(p) for p in self._require_model().end_of_turn_batch(pcms)]

    def _speak_batch(self, items: list[tuple[str, SpeechStyle, str]]) -> list[np.ndarray]:
        """kind: "prompt" (cached, also on disk), "dynamic" (a sentence said once: kept out of the prompt
        caches) or "chunk" (one clause of a streamed sentence, uncached)."""
        return [self.voice.render_chunk(t, s) if kind == "chunk" else self.voice.render(t, s, dynamic=kind == "dynamic")
                for t, s, kind in items]

    def _render_idle(self, text: str, style: SpeechStyle) -> bool:
        """True when the voice rendered it, False when it came from the disk cache."""
        if self.voice.cached(text, style) is not None:
            return False
        self.voice.render(text, style)
        return True

    # ---- helpers -------------------------------------------------------------------------------
    def _check_fault(self, op: str) -> None:
        fault = (self.fault or os.environ.get("BOT_ENGINE_FAULT", "none")).lower()
        if fault == op or fault == "all":
            ERRORS.labels(component="engine", kind="fault_injected").inc()
            raise EngineFault(f"injected {op} fault (BOT_ENGINE_FAULT={fault})")

    @staticmethod
    def _bad_input(op: str, exc: Exception) -> EngineInputError:
        ERRORS.labels(component="engine", kind="bad_input").inc()
        log().warning("bad engine input", op=op, error=str(exc))
        return exc if isinstance(exc, EngineInputError) else EngineInputError(str(exc))

    def _pcm(self, op: str, pcm: Any) -> np.ndarray:
        try:
            return check_pcm(pcm)
        except EngineInputError as exc:
            raise self._bad_input(op, exc) from None

    def _text(self, text: Any) -> str:
        try:
            return clean_text(text)
        except VoiceError as exc:
            raise self._bad_input("speak", exc) from None

    # ---- the SpeechEngine contract -----------------------------------------------------------
    @property
    def voice(self) -> Voice:
        """The voice; blocks until it has loaded (worker threads, tests). Async code: wait_ready()."""
        return self._voice.result()

    @property
    def ready(self) -> bool:
        return self._voice.done() and self._voice.exception() is None

    async def wait_ready(self) -> None:
        """Wait for the background voice load (raises EngineError if it failed). A waiter that is cancelled
        (start-up stopped by Ctrl-C) must not cancel the load itself: the shared future would never be set."""
        await asyncio.shield(asyncio.wrap_future(self._voice))

    @property
    def has_understanding(self) -> bool:
        return self.model is not None

    async def understand(self, pcm: np.ndarray) -> Understanding:
        self._check_fault("understand")
        pcm = self._pcm("understand", pcm)
        self._require_model()
        return await self._understand.submit(pcm)

    async def end_of_turn(self, pcm: np.ndarray) -> float:
        self._check_fault("end_of_turn")
        pcm = self._pcm("end_of_turn", pcm)
        self._require_model()
        return await self._eot.submit(pcm)

    async def speak(self, text: str, style: SpeechStyle | None = None) -> np.ndarray:
        self._check_fault("speak")
        text, style = self._text(text), style or SpeechStyle()
        hit = self.voice.cached(text, style, memory_only=True) if self.ready else None
        if hit is not None:  # memory hit: no queueing at all (disk hits are read in the worker)
            return hit
        return await self._speak.submit((text, style, "prompt"))

    async def speak_stream(self, text: str, style: SpeechStyle | None = None) -> AsyncIterator[np.ndarray]:
        """Yield 8 kHz int16 chunks as soon as each clause is rendered (first clause is kept short);
        the next clause renders while the caller plays this one. Cached prompts come as one chunk."""
        self._check_fault("speak")
        text, style = self._text(text), style or SpeechStyle()
        hit = self.voice.cached(text, style, memory_only=True) if self.ready else None
        if hit is not None:
            yield hit
            return
        chunks = split_chunks(text)
        if len(chunks) == 1:
            yield await self._speak.submit((text, style, "dynamic"))
            return
        # One clause in flight per call: the next renders while this one plays. Queueing two up front put
        # every caller's second clause ahead of the next caller's first (6 calls at once: first audio p50
        # 4.1 s -> 1.7 s with one in flight, measured on this 2-core box under load).
        tasks = [asyncio.ensure_future(self._clause(chunks[0], style))]
        parts: list[np.ndarray] = []
        try:
            for i in range(len(chunks)):
                part = await tasks[i]
                if i + 1 < len(chunks):
                    tasks.append(asyncio.ensure_future(self._clause(chunks[i + 1], style)))
                parts.append(part)
                yield part
        finally:
            for t in tasks:
                t.cancel()
        self.voice.remember(text, style, np.concatenate(parts))

    async def _clause(self, text: str, style: SpeechStyle) -> np.ndarray:
        keep = self.clause_cache_size > 0 and self.ready and not any(ch.isdigit() for ch in text)
        key = self.voice.key(text, style) if keep else ""
        if keep and (hit := self._clauses.get(key)) is not None:
            self._clauses.move_to_end(key)
            return hit
        pcm: np.ndarray = await self._speak.submit((text, style, "chunk"))
        if keep:
            self._clauses[key] = pcm
            while len(self._clauses) > self.clause_cache_size:
                self._clauses.popitem(last=False)
        return pcm

    def clear_clause_cache(self) -> None:
        """Benchmarks: first audio of a sentence whose clauses were never heard."""
        self._clauses.clear()

    async def prerender(self, texts: list[str], style: SpeechStyle | None = None, *,
                        background: bool = False) -> int:
        """Render and cache prompts ahead of time; bad prompts are logged and skipped, not fatal. Returns how
        many the voice rendered (in neither cache; foreground: not in memory).

        background: for prompts no caller waits for yet (a worker that is already taking calls): one at a
        time on the idle renderer (lowest CPU priority, not in the speak queue), yielding while callers'
        speech is queued. A caller who needs one of them first has it rendered on demand as usual."""
        rendered = 0
        if background and texts:
            try:
                await self.wait_ready()
            except EngineError as exc:  # logged and counted where the voice failed to load
                log().warning("prerender skipped: no voice", error=str(exc), prompts=len(texts))
                return 0
        for text in texts:
            try:
                if not background:
                    hit = self.voice.cached(self._text(text), style or SpeechStyle(), memory_only=True) \
                        if self.ready else None
                    if hit is None:
                        rendered += 1
                    await self.speak(text, style)
                    continue
                self._check_fault("speak")
                clean, st = self._text(text), style or SpeechStyle()
                if self.voice.cached(clean, st, memory_only=True) is not None:
                    continue
                while self._speak.queued:  # callers' speech first: it is rendered at normal priority
                    await asyncio.sleep(0.05)
                rendered += bool(await self._idle.submit(clean, st))
            except EngineError as exc:
                log().warning("prerender skipped a prompt", error=str(exc))
            except (VoiceError, OSError, RuntimeError, ValueError) as exc:  # the idle renderer's own failures
                ERRORS.labels(component="engine", kind="prerender_failed").inc()
                log().warning("prerender skipped a prompt", error=repr(exc), text=text[:40])
        return rendered

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._idle.close)
        for sched in (self._understand, self._eot, self._speak):
            await sched.close()

    def stats(self) -> dict[str, Any]:
        return {op: {"batches": s.batches, "items": s.items, "queued": s.queued}
                for op, s in (("understand", self._understand), ("end_of_turn", self._eot), ("speak", self._speak))}
