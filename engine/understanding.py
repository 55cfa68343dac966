"""Run-time understanding: 8 kHz caller audio -> Understanding, with ONNX Runtime only (no PyTorch).

One forward pass of the fine-tuned Whisper-tiny encoder with joint heads gives the calibrated intent
distribution, slot tokens (amount / digits / day), a CTC transcript, frustration and end of turn.
Audio longer than the 8 s window is cut at pauses into pieces (engine.long_turns): the last piece gives
the intent, end of turn and caller state (the end of a turn carries the request and the end-of-turn
cue); slot tokens and the transcript are read from every piece in order, so a long read-out keeps its
first digits. Synchronous and thread-safe (ORT sessions may be shared across threads); the async
batching facade lives in engine/runtime.py.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from engine.features import SR_IN, bucket_seconds, log_mel, prepare_pcm
from engine.graphs import PORTABLE_FILE, select_graph
from engine.long_turns import SR, WINDOW_S, turn_pieces
from engine.textnorm import SLOT_MERGE_GAP, SLOT_TOKENS, UNITS, chars_to_text, ctc_greedy, parse_slots
from engine.types import Understanding
from ops.logs import get_logger
from ops.metrics import ENGINE_MODEL, ERRORS

DEFAULT_MODEL = "understand-v11"
MIN_SECONDS = 0.2
SILENCE_DBFS = -55.0
TOP_K = 3
NULL = "<null>"
WINDOW_SAMPLES = int(WINDOW_S * SR)
# End of turn while a caller reads digits one by one ("four two ... seven one"): the head scored the pause
# after a first group as finished (0.6-0.8 on "four two", "my account number is four two"), so the bot
# answered into the middle of an account number. There, below DIGIT_READ_SURE, the answer is capped under
# the bot's threshold (0.5) and the max-silence rule (1 s) ends the turn: callers pause 80-500 ms between
# groups. Whole read-outs mostly score >= 0.9 and still end at once: real speaker (data/eval_asterisk) 3 of
# 200 turns now wait the 1 s (0.74-0.89); synthetic test_eot accuracy 0.861 -> 0.863 (3 of 800 changed).
DIGIT_READ_EOT_CAP = 0.2
DIGIT_READ_SURE = 0.9
_DIGIT_IDS = frozenset(SLOT_TOKENS.index(w) for w in (*UNITS, "oh"))
_WORDS_AFTER_FRAMES = 12  # 240 ms of characters after the last slot word: the caller said more after it
log = get_logger("engine.understanding")


def _amount(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def default_model_dir() -> Path:
    return Path(__file__).parent / "models" / DEFAULT_MODEL


class UnderstandingModel:
    def __init__(self, model_dir: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        self.model_dir = model_dir
        self.config = json.loads((model_dir / "config.json").read_text())
        self.intents: list[str] = self.config["intents"]
        self.intent_slots: dict[str, list[str]] = self.config.get("intent_slots", {})
        self.slot_types: dict[str, str] = self.config.get("slot_types", {})
        self._name_of_type = {t: n for n, t in self.slot_types.items()}
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, int(threads))
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.graph = select_graph(model_dir)  # 8-bit weights on CPUs with VNNI, 7-bit elsewhere (engine/graphs.py)
        self.session = ort.InferenceSession(str(self.graph), so, providers=["CPUExecutionProvider"])
        log.info("understanding_model_loaded", model=model_dir.name, graph=self.graph.name)
        # a fleet of mixed CPUs runs two graphs with different accuracy (engine/graphs.py): visible per worker
        ENGINE_MODEL.labels(model=model_dir.name, graph=self.graph.name).set(1)
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._features: ThreadPoolExecutor | bool | None = None  # created on first GPU-sized batch
        self._features_lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: str | None = None, threads: int = 1) -> "UnderstandingModel":
        d = Path(model_dir) if model_dir else default_model_dir()
        if not (d / PORTABLE_FILE).exists() or not (d / "config.json").exists():
            raise FileNotFoundError(f"no understanding model in {d} (expected {PORTABLE_FILE} and config.json)")
        return cls(d, threads)

    # ---- input checks ----

    def _check(self, pcm: object) -> tuple[np.ndarray | None, str | None]:
        try:
            x = prepare_pcm(pcm, max_seconds=None)  # type: ignore[arg-type]
        except (ValueError, TypeError) as exc:
            return None, f"bad_input: {exc}"
        if len(x) < MIN_SECONDS * SR_IN:
            return None, f"too_short: {len(x) / SR_IN:.2f} s of audio (need >= {MIN_SECONDS} s)"
        # A DC offset (some analog gateways and ATAs add one) is no speech: counted as energy it let an
        # offset-only line through the silence check (read as "affirm" 0.59) and hid every pause from the
        # long-turn cutter. Removed once here, so the checks, the cuts and the features all see the AC part.
        x = x - np.float32(x.mean(dtype=np.float64))
        rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
        if 20 * np.log10(rms + 1e-12) < SILENCE_DBFS:
            return None, "silence: no speech energy in the audio"
        return x, None

    def _error(self, reason: str) -> Understanding:
        kind = reason.split(":", 1)[0]
        ERRORS.labels(component="engine", kind=kind).inc()
        log.warning("understand_bad_input", reason=reason)
        return Understanding(intent="out_of_scope", confidence=0.0, alternatives=[("out_of_scope", 0.0)],
                             error=reason, end_of_turn=0.0)

    # ---- inference ----

    def _run(self, xs: list[np.ndarray]) -> tuple[list[np.ndarray], float, float]:
        """Group by length bucket so each clip's features do not depend on what it is batched with."""
        t0 = time.perf_counter()
        groups: dict[int, list[int]] = {}
        for i, x in enumerate(xs):
            groups.setdefault(bucket_seconds(len(x)), []).append(i)
        one_by_one = self._int8_on_ort()
        device_front = None if one_by_one else getattr(self.session, "log_mel_batch", None)
        feats: dict[int, Any]
        if device_front is not None:  # a GPU session computes features where the model runs
            feats = {s: device_front([xs[i] for i in idx], s) for s, idx in groups.items()}
        else:
            jobs = [(s, i) for s, idx in groups.items() for i in idx]
            pool = self._feature_pool() if not one_by_one and len(jobs) >= 4 else None
            mels = list(pool.map(lambda j: log_mel(xs[j[1]], j[0]), jobs)) if pool else [log_mel(xs[i], s) for s, i in jobs]
            by_clip = {i: m for (_s, i), m in zip(jobs, mels)}
            feats = {s: np.stack([by_clip[i] for i in idx]) for s, idx in groups.items()}
        t1 = time.perf_counter()
        results: list[list[np.ndarray] | None] = [None] * len(xs)
        for s, idx in groups.items():
            size = 1 if one_by_one else len(idx)
            for a in range(0, len(idx), size):
                outs = self.session.run(self._outputs, {"mel": feats[s][a : a + size]})
                for j, i in enumerate(idx[a : a + size]):
                    results[i] = [o[j] for o in outs]
        t2 = time.perf_counter()
        return results, (t1 - t0) * 1000, (t2 - t1) * 1000  # type: ignore[return-value]

    def _feature_pool(self) -> ThreadPoolExecutor | None:
        """Threads for numpy features when another process or device runs whole batches (a Triton server,
        a GPU session without its own front end): the model is fast there and features (~3.5 ms per 4 s
        clip, partly GIL-free) would set the pace on one thread. BOT_ENGINE_FEATURE_THREADS, default
        min(8, CPUs); 1 turns it off. On the CPU backend the model runs clip by clip on the worker's own
        thread(s), so features stay there too."""
        with self._features_lock:  # two scheduler workers may ask at once
            if self._features is None:
                n = int(os.environ.get("BOT_ENGINE_FEATURE_THREADS", "0") or 0) or min(8, os.cpu_count() or 1)
                self._features = ThreadPoolExecutor(n, thread_name_prefix="features") if n > 1 else False
        return self._features or None

    def _int8_on_ort(self) -> bool:
        """Dynamic int8 quantization scales activations over the whole input tensor, so under ONNX Runtime
        a clip's result would depend on the clips batched with it (measured on understand-v6: confidence
        moved by up to 0.12 and 2 of 300 validation top intents changed). One run per clip keeps every
        call's result its own, and on CPU it is no slower (8 x 4 s clips, one thread: 185 ms one by one,
        235 ms as one batch). A GPU backend's session quantises per batch row (engine/backends/torch_backend.py),
        so it runs whole batches and each clip still gets its own result."""
        import onnxruntime as ort

        return bool(self.config.get("quantized", True)) and isinstance(self.session, ort.InferenceSession)

    def _slots(self, intent: str | None, slot_ids: list[np.ndarray]) -> tuple[dict[str, object], dict[str, list[Any]]]:
        """Slots, and the candidates of a slot said with several values, from the decoded slot tokens of all
        of a turn's pieces, read as one sequence (a digit string may run across a cut)."""
        found = parse_slots(sum((ctc_greedy(ids.tolist(), merge_gap=SLOT_MERGE_GAP) for ids in slot_ids), []))
        heard = {typ: found.pop(typ + "_heard") for typ in ("money", "day") if typ + "_heard" in found}
        allowed_types = {self.slot_types[n] for n in self.intent_slots.get(intent or "", []) if n in self.slot_types}
        if intent is None:
            allowed_types = set(self.slot_types.values())
        allowed_types.add("digits")  # an account number may come with any request
        out: dict[str, object] = {}
        if "money_bare" in found and "money" not in found and intent is not None and "money" in allowed_types:
            found["money"] = found["money_bare"]
        for typ, val in found.items():
            name = self._name_of_type.get(typ)
            if name and typ in allowed_types:
                out[name] = _amount(val) if typ == "money" else val
        candidates: dict[str, list[Any]] = {}
        for typ, values in heard.items():
            name = self._name_of_type.get(typ)
            if name and typ in allowed_types:
                candidates[name] = [_amount(v) for v in values] if typ == "money" else values
        return out, candidates

    @staticmethod
    def _reading_digits(slot_frames: np.ndarray, char_frames: np.ndarray) -> bool:
        """True when the clip ends in a digit string said digit by digit (>= 2 single-digit words, the last
        of them the last word heard): "four two", not "forty two", nor "four two seven, is that okay"."""
        tokens = ctc_greedy(slot_frames.tolist(), merge_gap=SLOT_MERGE_GAP)
        run = 0
        for t in reversed(tokens):
            if t not in _DIGIT_IDS:
                break
            run += 1
        if run < 2:
            return False
        last_slot = int(np.flatnonzero(slot_frames)[-1])
        chars = np.flatnonzero(char_frames)
        return not len(chars) or int(chars[-1]) - last_slot <= _WORDS_AFTER_FRAMES

    def _end_of_turn(self, p: float, outs: list[np.ndarray]) -> float:
        """The head's probability, except mid digit read-out, where only a sure answer counts."""
        if p < DIGIT_READ_SURE and self._reading_digits(np.asarray(outs[3]), np.asarray(outs[4])):
            return min(p, DIGIT_READ_EOT_CAP)
        return p

    def understand_batch(self, pcms: list[np.ndarray]) -> list[Understanding]:
        if not isinstance(pcms, (list, tuple)):
            raise ValueError("understand_batch expects a list of int16 8 kHz PCM arrays")
        t_start = time.perf_counter()
        checked = [self._check(p) for p in pcms]
        good = [i for i, (x, err) in enumerate(checked) if err is None]
        out: list[Understanding | None] = [None] * len(pcms)
        for i, (_, err) in enumerate(checked):
            if err is not None:
                out[i] = self._error(err)
        if good:
            # slots and transcript from even pieces; intent, caller state and end of turn from the last
            # ~8 s, run as one more piece when the turn is longer than the window
            split = {i: turn_pieces(checked[i][0]) for i in good}  # type: ignore[arg-type]
            reads = {i: split[i][0] for i in good}
            pieces = {i: reads[i] + ([] if split[i][1] is None else [split[i][1]]) for i in good}
            results, t_feat, t_model = self._run([p for i in good for p in pieces[i]])
            total = (time.perf_counter() - t_start) * 1000
            at = 0
            for i in good:
                ran = results[at : at + len(pieces[i])]
                at += len(pieces[i])
                rs = ran[: len(reads[i])]
                probs, frust, eot = ran[-1][:3]
                order = np.argsort(-probs)[:TOP_K]
                names = [None if self.intents[k] == NULL else self.intents[k] for k in order]
                intent = names[0]
                slots, candidates = self._slots(intent, [r[3] for r in rs])
                transcript = " ".join(t for t in (chars_to_text(ctc_greedy(r[4].tolist())) for r in rs) if t)
                alternatives = [(n, float(probs[k])) for n, k in zip(names, order)]
                if not transcript.strip() and not slots and not candidates:
                    # Not one character or slot word heard: noise, not speech. The intent head was never
                    # trained on non-speech: 27 of 120 noise blips (30-300 ms, silence around) came back
                    # "affirm" at 0.80-0.90, a yes to a read-back (context_accept 0.8) nobody said. Measured
                    # on speech: 0 of 1,893 complete utterances (real speaker clean, in 5-10 dB babble/pink,
                    # through 4 codecs; held-out synthetic test) came out empty; 2 of 500 end-of-turn clips
                    # ("wrong", a cut-off "sure"). No error: the audio is valid and the model ran (its end of
                    # turn stands); the policy reads confidence 0 as a turn not understood and asks again.
                    ERRORS.labels(component="engine", kind="no_speech").inc()
                    log.info("understand_no_speech", intent=intent, confidence=round(float(probs[order[0]]), 3))
                    intent, alternatives = "out_of_scope", [("out_of_scope", 0.0)]
                    probs = np.zeros_like(probs)
                out[i] = Understanding(
                    intent=intent,
                    confidence=float(probs[order[0]]),
                    alternatives=alternatives,
                    slots=slots,
                    slot_candidates=candidates,
                    transcript=transcript,
                    caller_state={"frustration": round(float(frust), 4)},
                    end_of_turn=self._end_of_turn(float(eot), ran[-1]),
                    timings={"features": round(t_feat, 2), "model": round(t_model, 2), "total": round(total, 2),
                             "batch": float(len(good)), "pieces": float(len(rs))},
                )
        return out  # type: ignore[return-value]

    def understand(self, pcm: np.ndarray) -> Understanding:
        return self.understand_batch([pcm])[0]

    def end_of_turn_batch(self, pcms: list[np.ndarray]) -> list[float]:
        """Probability each clip is a finished turn; 0.0 for clips that cannot be scored (too short, silence);
        at most DIGIT_READ_EOT_CAP while digits are being read out, unless the head is sure (DIGIT_READ_SURE).
        Only the last window matters here, so a long turn is not cut into pieces (see understand_batch)."""
        tails = [p[-WINDOW_SAMPLES:] if isinstance(p, np.ndarray) and p.ndim >= 1 else p for p in pcms]
        return [u.end_of_turn if u.error is None else 0.0 for u in self.understand_batch(tails)]
