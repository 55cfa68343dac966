"""`bot engine bench`: throughput and latency of the engine per backend, batching gain, speak latency.

Measures, for each available backend: understand latency p50/p95 and utterances/s vs batch size and
utterance length (direct batch calls), the batching gain (scheduler with batching vs the same scheduler
with max_batch=1, 50 concurrent callers each sending one turn after another), the p95 queue wait the
batching adds, how many concurrent real-time callers that throughput serves (one turn of the mean test
length every `--turn-every` seconds per caller), and the voice's first-audio latency p50/p95 (speak_stream
of dynamic sentences, nothing cached).

It uses the shipped understanding model when installed; otherwise (clearly reported as such) pipecat's
smart-turn v3.2 ONNX, a real Whisper-tiny-encoder model, through the same code paths.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engine.types import SAMPLE_RATE, Understanding


def smart_turn_path() -> Path:
    """pipecat's bundled smart-turn v3.2 graph; resolved on use, so this module imports without pipecat
    (ops/bench/gpu_backend runs its callers loop on a bare GPU machine)."""
    import pipecat

    return Path(pipecat.__file__).parent / "audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"


class SmartTurnReference:
    """A real batched ONNX model with the UnderstandingModel interface (for scheduler tests and the bench
    before/without the trained model): pipecat's smart-turn v3.2 end-of-turn classifier. Its
    Understanding carries only the end-of-turn probability (intent None), marked in `error`."""

    backend_name = "onnx"

    def __init__(self, threads: int = 1, onnx_path: Path | None = None) -> None:
        from engine.backends.onnx_cpu import OrtCpuBackend

        self.session = OrtCpuBackend().session(str(onnx_path or smart_turn_path()), threads)

    @staticmethod
    def features(pcm: np.ndarray) -> np.ndarray:
        from pipecat.audio.turn.smart_turn._whisper_features import compute_whisper_log_mel_features
        import soxr

        audio = soxr.resample(pcm.astype(np.float32) / 32768.0, SAMPLE_RATE, 16000)[-128000:]
        audio = np.pad(audio, (128000 - len(audio), 0))  # speech ends at the last frame, like smart-turn
        return compute_whisper_log_mel_features(audio, do_normalize=True).astype(np.float32)

    def end_of_turn_batch(self, pcms: list[np.ndarray]) -> list[float]:
        feats = np.stack([self.features(p) for p in pcms])
        return [float(x) for x in self.session.run(None, {"input_features": feats})[0].reshape(-1)]

    def understand_batch(self, pcms: list[np.ndarray]) -> list[Understanding]:
        return [Understanding(intent=None, confidence=0.0, end_of_turn=p, error="reference model (no intents)")
                for p in self.end_of_turn_batch(pcms)]


def load_model(threads: int = 1, backend: str = "onnx") -> tuple[Any, str]:
    """(model, description): the trained UnderstandingModel when installed, else the smart-turn reference."""
    from engine.runtime import EngineUnavailable, _load_understanding

    try:
        return _load_understanding(None, backend, threads), "engine.understanding.UnderstandingModel"
    except EngineUnavailable as exc:
        return SmartTurnReference(threads), f"smart-turn v3.2 reference (understanding model unavailable: {exc})"


def speech_clips(seconds: list[float], n: int, seed: int = 0, voice_kind: str = "piper") -> list[np.ndarray]:
    """Speech cut/padded to each length: the Piper voice (sampled, differs run to run) or espeak
    (deterministic, for tests)."""
    from engine.voice import Voice, load_renderer

    voice = Voice(load_renderer(voice_kind), cache_dir=None)
    base = np.concatenate([voice.render(t) for t in (
        "I would like to pay my bill of forty dollars, please.",
        "My internet has been down since this morning and nobody called me back.",
        "Can you schedule a technician for Tuesday?")])
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(seconds[i % len(seconds)] * SAMPLE_RATE)
        start = int(rng.integers(0, max(1, len(base) - length)))
        clip = base[start:start + length]
        out.append(np.pad(clip, (0, length - len(clip))).astype(np.int16))
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else float("nan")


def _ms(xs: list[float]) -> dict[str, float]:
    return {"p50": round(pct(xs, 50) * 1000, 2), "p95": round(pct(xs, 95) * 1000, 2)}


def bench_direct(fn: Callable[[list[np.ndarray]], Any], seconds: list[float], batch_sizes: list[int],
                 reps: int) -> list[dict[str, Any]]:
    """Latency/throughput of one batch call vs batch size and utterance length (no scheduler)."""
    rows = []
    for sec in seconds:
        clips = speech_clips([sec], max(batch_sizes))
        fn(clips[:1])  # warm-up
        for bs in batch_sizes:
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn(clips[:bs])
                times.append(time.perf_counter() - t0)
            rows.append({"seconds": sec, "batch": bs, "latency_ms": _ms(times),
                         "utterances_per_s": round(bs / statistics.median(times), 2)})
    return rows


async def _callers(engine: Any, clips: list[np.ndarray], callers: int, turns: int) -> tuple[float, list[float]]:
    """`callers` concurrent calls, each sending `turns` turns back to back; returns (elapsed, latencies)."""
    lat: list[float] = []

    async def call(i: int) -> None:
        for t in range(turns):
            t0 = time.perf_counter()
            await engine.understand(clips[(i * turns + t) % len(clips)])
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(call(i) for i in range(callers)))
    return time.perf_counter() - t0, lat


async def bench_batching(model: Any, callers: int, turns: int, seconds: list[float]) -> dict[str, Any]:
    from engine.batching import BatchConfig
    from engine.runtime import Engine
    from engine.voice import EspeakVoice, Voice

    clips = speech_clips(seconds, 64, seed=1)
    voice = Voice(EspeakVoice(), cache_dir=None)  # speak is not measured here
    result: dict[str, Any] = {}
    max_batch = int(os.environ.get("BOT_ENGINE_MAX_BATCH", "32"))
    modes = [("unbatched", BatchConfig(max_batch=1, workers=1, adaptive=False, max_queue=max(256, callers * 2))),
             ("batched", BatchConfig(max_batch=max_batch, workers=1, adaptive=False, max_queue=max(256, callers * 2))),
             ("batched_adaptive", BatchConfig(max_batch=max_batch, workers=1, adaptive=True, max_queue=max(256, callers * 2))),
             ("adaptive_2_workers", BatchConfig(max_batch=max_batch, workers=2, adaptive=True, max_queue=max(256, callers * 2)))]
    for mode, cfg in modes:
        engine = Engine(model, voice, config=cfg, backend=getattr(model, "backend_name", "onnx"))
        try:
            await _callers(engine, clips, min(callers, 4), 1)  # warm-up
            elapsed, lat = await _callers(engine, clips, callers, turns)
            st = engine.stats()["understand"]
        finally:
            await engine.close()
        result[mode] = {"utterances_per_s": round(callers * turns / elapsed, 2), "latency_ms": _ms(lat),
                        "mean_batch": round(st["items"] / max(1, st["batches"]), 2)}
    base = result["unbatched"]["utterances_per_s"]
    result["batching_gain"] = round(result["batched"]["utterances_per_s"] / base, 2)  # fixed max batch
    result["adaptive_gain"] = round(result["batched_adaptive"]["utterances_per_s"] / base, 2)
    result["adaptive_2_workers_gain"] = round(result["adaptive_2_workers"]["utterances_per_s"] / base, 2)
    return result


async def bench_added_wait(model: Any, callers: int, seconds: list[float], turn_every_s: float) -> dict[str, Any]:
    """Wait under a realistic load: `callers` calls, each one turn every `turn_every_s` s (random phase).
    added_wait = time queued while the worker was idle (what batching adds); queue_wait = all queueing,
    including waiting for a busy worker (capacity)."""
    from engine.batching import BatchConfig
    from engine.runtime import Engine
    from engine.voice import EspeakVoice, Voice

    clips = speech_clips(seconds, 64, seed=2)
    engine = Engine(model, Voice(EspeakVoice(), cache_dir=None), config=BatchConfig(max_queue=max(256, callers * 2)))
    sched = engine._understand
    queue: list[float] = []
    real_execute = sched._execute

    async def execute(batch: list[Any]) -> None:  # exact per-request queue time (the histogram is bucketed)
        now = time.perf_counter()
        queue.extend(now - r.enqueued for r in batch)
        await real_execute(batch)

    sched._execute = execute  # type: ignore[method-assign]
    rng = np.random.default_rng(3)
    lat: list[float] = []

    async def call(i: int) -> None:
        await asyncio.sleep(float(rng.uniform(0, turn_every_s)))
        for t in range(3):
            t0 = time.perf_counter()
            await engine.understand(clips[(i + t) % len(clips)])
            lat.append(time.perf_counter() - t0)
            await asyncio.sleep(turn_every_s)

    try:
        await engine.understand(clips[0])  # warm-up
        sched.added_wait.clear()
        await asyncio.gather(*(call(i) for i in range(callers)))
    finally:
        await engine.close()
    st = engine.stats()["understand"]
    return {"callers": callers, "turn_every_s": turn_every_s, "added_wait_ms": _ms(list(sched.added_wait)),
            "queue_wait_ms": _ms(queue), "latency_ms": _ms(lat),
            "mean_batch": round(st["items"] / max(1, st["batches"]), 2)}


async def bench_speak(n: int) -> dict[str, Any]:
    from engine.runtime import Engine
    from engine.voice import Voice, load_renderer

    # Every other sentence is the read-back each payment hears (policies/default.yaml confirm_payment), whose
    # short first clause is where first audio used to be slowest; the others are long dynamic sentences.
    sentences = [f"Your payment of {d} dollars and {c} cents is scheduled for {day}, and you will get a "
                 f"confirmation by text message." if i % 2 == 0 else f"That's a payment of {d} dollars, is that right?"
                 for i, (d, c, day) in
                 enumerate(zip(range(17, 17 + n), range(3, 3 + n), ["Monday", "Tuesday", "Friday", "tomorrow"] * n))]
    voice = Voice(load_renderer("piper"), cache_dir=None)
    engine = Engine(None, voice)
    first: list[float] = []
    total: list[float] = []
    try:
        await engine.speak("Warm up, please.")
        for s in sentences:
            t0 = time.perf_counter()
            got_first = False
            async for _chunk in engine.speak_stream(s):
                if not got_first:
                    first.append(time.perf_counter() - t0)
                    got_first = True
            total.append(time.perf_counter() - t0)
    finally:
        await engine.close()
    return {"voice": voice.name, "n": len(sentences), "first_audio_ms": _ms(first), "full_sentence_ms": _ms(total)}


def available_backends() -> list[str]:
    out = ["onnx"]
    try:
        import torch

        if torch.cuda.is_available():
            out.append("torch")
    except ImportError:
        pass
    try:
        import tensorrt  # noqa: F401

        out.append("tensorrt")
    except ImportError:
        pass
    return out


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    seconds = [float(s) for s in args.seconds.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    report: dict[str, Any] = {"cpu_count": os.cpu_count(), "threads": args.threads, "backends": {}}
    for backend in available_backends() if args.backend == "all" else [args.backend]:
        model, desc = load_model(args.threads, backend)
        report["model"] = desc
        rows = bench_direct(model.understand_batch, seconds, batch_sizes, args.reps)
        report["backends"][getattr(model, "backend_name", backend)] = {"understand": rows}
        if backend == "onnx":
            batching = asyncio.run(bench_batching(model, args.callers, args.turns, seconds))
            report["batching"] = batching
            report["batching_gain"] = batching["batching_gain"]
            mean_len = sum(seconds) / len(seconds)
            # a caller produces one turn (~mean_len s of speech) every turn_every s
            report["realtime_callers"] = {"assumed_turn_every_s": args.turn_every, "mean_turn_s": mean_len, **{
                mode: int(batching[mode]["utterances_per_s"] * args.turn_every)
                for mode in ("unbatched", "batched", "batched_adaptive", "adaptive_2_workers")}}
            report["added_wait"] = asyncio.run(bench_added_wait(model, args.callers, seconds, args.turn_every))
            report["p95_added_wait_ms"] = report["added_wait"]["added_wait_ms"]["p95"]
    if not args.no_speak:
        report["speak"] = asyncio.run(bench_speak(args.speak_n))
    return report


def _print_human(r: dict[str, Any]) -> None:
    print(f"model: {r.get('model')}  cpus={r['cpu_count']} threads={r['threads']}")
    for name, b in r["backends"].items():
        print(f"[{name}] understand, direct batch calls")
        for row in b["understand"]:
            print(f"  {row['seconds']:>4.1f}s x{row['batch']:<3} p50 {row['latency_ms']['p50']:8.1f} ms  "
                  f"p95 {row['latency_ms']['p95']:8.1f} ms  {row['utterances_per_s']:8.1f} utt/s")
    if "batching" in r:
        b = r["batching"]
        for mode in ("unbatched", "batched", "batched_adaptive", "adaptive_2_workers"):
            print(f"{mode:>10}: {b[mode]['utterances_per_s']} utt/s, latency p50/p95 {b[mode]['latency_ms']}, "
                  f"mean batch {b[mode]['mean_batch']}")
        w = r["added_wait"]
        print(f"adaptive gain: {b['adaptive_gain']}x   adaptive + 2 workers gain: {b['adaptive_2_workers_gain']}x")
        print(f"batching_gain: {r['batching_gain']}x   p95 added wait: {r['p95_added_wait_ms']} ms   "
              f"(load {w['callers']} callers, a turn every {w['turn_every_s']} s: queue wait {w['queue_wait_ms']}, "
              f"latency {w['latency_ms']}, mean batch {w['mean_batch']})")
        print(f"real-time callers: {r['realtime_callers']}")
    if "speak" in r:
        print(f"speak first audio: {r['speak']['first_audio_ms']}  full sentence: {r['speak']['full_sentence_ms']}")


def _check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, in words (None when they are usable)."""
    try:
        seconds = [float(x) for x in args.seconds.split(",")]
        batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    except ValueError:
        return (f"--seconds and --batch-sizes are comma-separated numbers (got {args.seconds!r} and "
                f"{args.batch_sizes!r})")
    if not all(0.2 <= x <= 60 for x in seconds):
        return "--seconds: utterance lengths between 0.2 and 60 s"
    if not all(b >= 1 for b in batch_sizes):
        return "--batch-sizes: each batch size >= 1"
    if args.backend != "all":
        from engine.backends import normalize

        try:
            normalize(args.backend)
        except ValueError as exc:
            return f"--backend: {exc}, or all"
    if args.reps < 1 or args.callers < 1 or args.turns < 1 or args.threads < 1 or args.turn_every <= 0:
        return "--reps, --callers, --turns and --threads must be >= 1 and --turn-every > 0"
    if not args.no_speak and args.speak_n < 1:
        return "--speak-n must be >= 1 (or --no-speak)"
    return None


def cmd_bench(args: argparse.Namespace) -> int:
    from ops.logs import configure_logging

    if (problem := _check_args(args)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    configure_logging()  # logs to stderr: stdout carries only the report
    report = run_bench(args)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    else:
        _print_human(report)
    return 0


def register(engine_subparsers: argparse._SubParsersAction) -> None:
    p = engine_subparsers.add_parser("bench", help="engine throughput/latency per backend, batching gain, speak latency")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.add_argument("--backend", default="onnx", help="onnx | torch | tensorrt | all (available ones)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("BOT_ENGINE_THREADS", "1")),
                   help="ONNX Runtime intra-op threads (default BOT_ENGINE_THREADS or 1)")
    p.add_argument("--seconds", default="2,4", help="utterance lengths (s), comma-separated")
    p.add_argument("--batch-sizes", default="1,4,16", help="direct batch sizes, comma-separated")
    p.add_argument("--reps", type=int, default=5, help="timed runs per batch size and length")
    p.add_argument("--callers", type=int, default=50, help="concurrent callers for the batching gain")
    p.add_argument("--turns", type=int, default=2, help="turns per caller (back to back) for the gain")
    p.add_argument("--turn-every", type=float, default=6.0, help="seconds between a caller's turns (real-time load)")
    p.add_argument("--speak-n", type=int, default=12, help="dynamic sentences for the voice's first-audio latency")
    p.add_argument("--no-speak", action="store_true", help="skip the voice measurement")
    p.set_defaults(func=cmd_bench)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="engine.bench")
    register(parser.add_subparsers(dest="cmd", required=True))
    ns = parser.parse_args(sys.argv[1:] or ["bench"])
    sys.exit(ns.func(ns))
