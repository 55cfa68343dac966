"""Silero VAD batched across every call of this worker.

pipecat's stock setup runs one Silero session per call: one ONNX call per 32 ms window per call,
which measured as much CPU as the whole transport. Here one ONNX run per 32 ms tick scores the
pending window of every active call at once (their recurrent states stacked on the batch axis),
in a dedicated executor thread so the event loop never waits on it. Windows quieter than an
energy gate skip the model entirely (prob 0): on a phone call most windows are silence.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from ops import metrics
from ops.logs import get_logger

log = get_logger("bot.turns_vad")

WINDOW = 256  # samples per Silero window at 8 kHz (32 ms)
CONTEXT = 32  # samples of the previous window Silero v5 prepends at 8 kHz
WINDOW_S = WINDOW / 8000
_RESET_AFTER_WINDOWS = 62  # ~2 s, like pipecat: the 8 kHz state drifts during long non-speech
_RESET_LOW_PROB = 0.1
_RESET_LOW_RUN = 5
# The gate is absolute, so a quiet caller's soft word endings and comma pauses fell under it where a loud
# caller's never do: the same sentence said 20 dB softer (-46 dBFS) was cut into pieces, its first words
# discarded as too short. For 512 ms after speech the gate sits _GATE_BELOW_SPEECH_DB under that speech's
# loudest window instead, if that is lower: a caller at a normal level (windows at -20 dBFS) keeps -50.
_GATE_HANGOVER = 16
_GATE_BELOW_SPEECH_DB = 30.0

# prob, rms_dbfs, time the window's last sample arrived (monotonic)
ProbCallback = Callable[[float, float, float], None]


def model_path() -> str:
    # find_spec on the top-level package does not import pipecat (and its logging setup)
    spec = importlib.util.find_spec("pipecat")
    assert spec is not None and spec.submodule_search_locations, "pipecat-ai is required for the Silero model"
    return str(Path(list(spec.submodule_search_locations)[0]) / "audio" / "vad" / "data" / "silero_vad.onnx")


def rms_dbfs(x: np.ndarray) -> float:
    """Level of the window's AC part (x: float32 in [-1, 1]). A DC offset on the caller's line is not
    sound: counted in, it lifted the bot's own echo above the barge-in level and defeated the gate."""
    n = max(1, len(x))
    m = float(x.sum(dtype=np.float64)) / n
    v = float(np.dot(x, x)) / n - m * m
    return 10.0 * np.log10(max(v, 0.0) + 1e-12)


class VadStream:
    """One call's view of the batched VAD. push() 20 ms frames; on_prob gets one score per 32 ms."""

    def __init__(self, owner: "BatchedVad", on_prob: ProbCallback) -> None:
        self._owner = owner
        self.on_prob = on_prob
        self._buf = np.zeros(WINDOW * 4, dtype=np.float32)
        self._n = 0
        self.pending: list[tuple[np.ndarray, float, float]] = []  # (window, rms_db, t)
        self.state = np.zeros((2, 128), dtype=np.float32)
        self.context = np.zeros(CONTEXT, dtype=np.float32)
        self.since_reset = 0
        self.low_run = 0
        self.hangover = 0  # windows left under the speech-relative gate
        self.speech_db = -120.0  # loudest speech window since the hangover began
        self.closed = False

    def push(self, pcm: np.ndarray, t: float) -> None:
        n = len(pcm)
        if self._n + n > len(self._buf):  # backlog: drop the oldest (never happens at 20 ms frames)
            self._n = 0
        self._buf[self._n : self._n + n] = pcm
        self._buf[self._n : self._n + n] *= 1.0 / 32768.0
        self._n += n
        while self._n >= WINDOW:
            w = self._buf[:WINDOW].copy()
            self._buf[: self._n - WINDOW] = self._buf[WINDOW : self._n]
            self._n -= WINDOW
            self.pending.append((w, rms_dbfs(w), t))
        if self.pending:
            self._owner._wake()

    def reset_model(self) -> None:
        self.state[:] = 0
        self.context[:] = 0
        self.since_reset = 0
        self.low_run = 0

    def close(self) -> None:
        self.closed = True
        self._owner._streams.discard(self)


class BatchedVad:
    def __init__(self, gate_dbfs: float = -50.0, threads: int = 1) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model_path(), sess_options=opts, providers=["CPUExecutionProvider"])
        self.gate_dbfs = gate_dbfs
        self._streams: set[VadStream] = set()
        self._event = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vad")
        self._task: asyncio.Task[None] | None = None
        self._sr = np.array(8000, dtype=np.int64)
        self.runs = 0
        self.scored = 0
        self.gated = 0

    def open(self, on_prob: ProbCallback) -> VadStream:
        s = VadStream(self, on_prob)
        self._streams.add(s)
        return s

    def _wake(self) -> None:
        self._event.set()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self._pool.shutdown(wait=False)

    def run_batch(self, x: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x: (B, CONTEXT+WINDOW) float32, state: (2, B, 128) -> (probs (B,), new state)."""
        out, new_state = self.session.run(None, {"input": x, "state": state, "sr": self._sr})
        return out[:, 0], new_state

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._event.wait()
            self._event.clear()
            # let the other calls' frames of this 32 ms tick arrive, then score them all at once
            await asyncio.sleep(0.004)
            try:
                while await self._round(loop):
                    pass
            except Exception:  # noqa: BLE001 - a VAD failure must not kill every call's turn taking
                metrics.ERRORS.labels("vad", "inference").inc()
                log.exception("vad_round_failed")

    async def _round(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Score the oldest pending window of every stream; True if any remain."""
        batch: list[tuple[VadStream, np.ndarray, float, float]] = []
        more = False
        for s in list(self._streams):
            if not s.pending:
                continue
            w, db, t = s.pending.pop(0)
            more = more or bool(s.pending)
            gate = self.gate_dbfs
            if s.hangover:
                s.hangover -= 1
                gate = min(gate, s.speech_db - _GATE_BELOW_SPEECH_DB)
            else:
                s.speech_db = -120.0
            if db < gate:
                self.gated += 1
                s.low_run += 1
                if s.low_run >= _RESET_LOW_RUN:
                    s.reset_model()
                s.on_prob(0.0, db, t)
                continue
            batch.append((s, w, db, t))
        if not batch:
            return more
        b = len(batch)
        x = np.empty((b, CONTEXT + WINDOW), dtype=np.float32)
        state = np.empty((2, b, 128), dtype=np.float32)
        for i, (s, w, _, _) in enumerate(batch):
            x[i, :CONTEXT] = s.context
            x[i, CONTEXT:] = w
            state[:, i, :] = s.state
        t0 = time.perf_counter()
        probs, new_state = await loop.run_in_executor(self._pool, self.run_batch, x, state)
        metrics.ENGINE_INFERENCE.labels("vad", "onnx").observe(time.perf_counter() - t0)
        self.runs += 1
        self.scored += b
        for i, (s, w, db, t) in enumerate(batch):
            if s.closed:
                continue
            s.state[:] = new_state[:, i, :]
            s.context[:] = w[-CONTEXT:]
            p = float(probs[i])
            s.since_reset += 1
            s.low_run = s.low_run + 1 if p < _RESET_LOW_PROB else 0
            if p >= 0.5:
                s.hangover = _GATE_HANGOVER
                s.speech_db = max(s.speech_db, db)
            if s.since_reset >= _RESET_AFTER_WINDOWS and s.low_run >= _RESET_LOW_RUN:
                s.reset_model()
            s.on_prob(p, db, t)
        return more
