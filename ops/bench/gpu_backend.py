"""The engine on a GPU (PyTorch backend: FP16, CUDA graphs): parity with ONNX Runtime CPU, latency and
throughput by batch size, and many concurrent callers through the real batching Engine.

Needs recorded clips, not synthesis (a GPU box may have no espeak-ng), so it runs in two steps:

    # here: pack labelled clips (validation voices + the real asterisk speaker) into one file
    .venv/bin/python -m ops.bench.gpu_backend pack data/synth3/val data/eval_asterisk --n 400 --out .gpu/clips.npz
    # on the GPU machine
    python -m ops.bench.gpu_backend run .gpu/clips.npz --out report.json

`run` prints a summary and writes the full figures as JSON. Without CUDA it stops with a clear message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.bench import _ms, pct


def pack(dirs: list[str], n: int, out: str) -> None:
    """The first n complete (untruncated) clips of each eval dir, int16 8 kHz, with their labels."""
    from engine.training.evaluate import load_wav, read_eval_dir

    audio: list[np.ndarray] = []
    labels: list[dict[str, Any]] = []
    for d in dirs:
        rows = [r for r in read_eval_dir(d) if not r.get("truncated")][:n]
        for r in rows:
            audio.append(load_wav(Path(d) / r["audio"]))
            labels.append({"set": Path(d).name, "intent": r.get("intent"), "slots": r.get("slots") or {}})
    lengths = np.array([len(a) for a in audio])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, pcm=np.concatenate(audio).astype(np.int16), lengths=lengths,
                        labels=np.array(json.dumps(labels)))
    sys.stderr.write(f"{len(audio)} clips, {lengths.sum() / 8000:.0f} s -> {out} ({os.path.getsize(out) >> 20} MiB)\n")


def _load(path: str) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    z = np.load(path)
    clips = np.split(z["pcm"], np.cumsum(z["lengths"])[:-1])
    return clips, json.loads(str(z["labels"]))


def _parity(cpu: Any, gpu: Any, clips: list[np.ndarray], labels: list[dict[str, Any]]) -> dict[str, Any]:
    ref = [cpu.understand_batch([c])[0] for c in clips]  # ONNX Runtime: one clip per run, as served on CPU
    got: list[Any] = []
    for a in range(0, len(clips), 32):  # the GPU as served: whole batches
        got += gpu.understand_batch(clips[a : a + 32])
    out: dict[str, Any] = {"n": len(clips)}
    for name in sorted({lab["set"] for lab in labels}):
        idx = [i for i, lab in enumerate(labels) if lab["set"] == name]
        out[name] = {
            "n": len(idx),
            "intent_accuracy_cpu": round(float(np.mean([ref[i].intent == labels[i]["intent"] for i in idx])), 4),
            "intent_accuracy_gpu": round(float(np.mean([got[i].intent == labels[i]["intent"] for i in idx])), 4),
            "slots_exact_cpu": round(float(np.mean([ref[i].slots == labels[i]["slots"] for i in idx])), 4),
            "slots_exact_gpu": round(float(np.mean([got[i].slots == labels[i]["slots"] for i in idx])), 4),
        }
    out["same_intent"] = round(float(np.mean([r.intent == g.intent for r, g in zip(ref, got)])), 4)
    out["same_slots"] = round(float(np.mean([r.slots == g.slots for r, g in zip(ref, got)])), 4)
    out["same_transcript"] = round(float(np.mean([r.transcript == g.transcript for r, g in zip(ref, got)])), 4)
    diffs = [abs(r.confidence - g.confidence) for r, g in zip(ref, got)]
    out["confidence_abs_diff"] = {"p50": round(float(np.median(diffs)), 4), "p95": round(float(np.percentile(diffs, 95)), 4),
                                  "max": round(float(np.max(diffs)), 4)}
    eot = [abs(r.end_of_turn - g.end_of_turn) for r, g in zip(ref, got)]
    out["end_of_turn_abs_diff_max"] = round(float(np.max(eot)), 4)
    return out


def _fixed(clips: list[np.ndarray], seconds: float) -> list[np.ndarray]:
    n = int(seconds * 8000)
    return [np.pad(c[:n], (0, max(0, n - len(c)))).astype(np.int16) for c in clips]


def _sweep(model: Any, clips: list[np.ndarray], batch_sizes: list[int], reps: int) -> list[dict[str, Any]]:
    rows = []
    for bs in batch_sizes:
        batch = [clips[i % len(clips)] for i in range(bs)]
        for _ in range(3):
            model.understand_batch(batch)  # capture + warm-up
        total, gpu = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            res = model.understand_batch(batch)
            total.append(time.perf_counter() - t0)
            gpu.append(res[0].timings["model"] / 1000)
        rows.append({"batch": bs, "total_ms": _ms(total),
                     "model_ms": _ms(gpu),
                     "utterances_per_s": round(bs / float(np.median(total)), 1)})
    return rows


async def _callers(model: Any, clips: list[np.ndarray], callers: int, turns: int, max_batch: int,
                   workers: int) -> dict[str, Any]:
    from engine.batching import BatchConfig
    from engine.bench import _callers as callers_loop
    from engine.runtime import Engine
    from engine.voice import EspeakVoice, Voice

    engine = Engine(model, Voice(EspeakVoice(), cache_dir=None), backend=getattr(model, "backend_name", "onnx"),
                    config=BatchConfig(max_batch=max_batch, workers=workers, adaptive=True, max_queue=callers * 4))
    try:
        await callers_loop(engine, clips, min(callers, 8), turns)  # warm-up
        elapsed, lat = await callers_loop(engine, clips, callers, turns)
        st = engine.stats()["understand"]
    finally:
        await engine.close()
    return {"callers": callers, "turns_each": turns, "max_batch": max_batch, "workers": workers,
            "utterances_per_s": round(callers * turns / elapsed, 1), "latency_ms": _ms(lat),
            "mean_batch": round(st["items"] / max(1, st["batches"]), 1)}


async def _paced(model: Any, clips: list[np.ndarray], callers: int, every_s: float, duration_s: float,
                 workers: int) -> dict[str, Any]:
    """A realistic load: each caller sends one turn every `every_s` seconds (random phase) for
    `duration_s`; the p95 here is what a caller waits on top of speaking."""
    from engine.batching import BatchConfig
    from engine.runtime import Engine
    from engine.voice import EspeakVoice, Voice

    engine = Engine(model, Voice(EspeakVoice(), cache_dir=None), backend=getattr(model, "backend_name", "onnx"),
                    config=BatchConfig(max_batch=128, workers=workers, adaptive=True, max_queue=callers * 2))
    lat: list[float] = []
    rng = np.random.default_rng(3)

    async def call(i: int) -> None:
        await asyncio.sleep(float(rng.uniform(0, every_s)))
        end = time.perf_counter() + duration_s
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            await engine.understand(clips[int(rng.integers(len(clips)))])
            lat.append(time.perf_counter() - t0)
            await asyncio.sleep(max(0.0, every_s - (time.perf_counter() - t0)))

    try:
        await asyncio.gather(*(call(i) for i in range(callers)))
        st = engine.stats()["understand"]
    finally:
        await engine.close()
    return {"callers": callers, "turn_every_s": every_s, "turns": len(lat), "workers": workers,
            "latency_ms": {**_ms(lat), "p99": round(pct(lat, 99) * 1000, 2)},
            "mean_batch": round(st["items"] / max(1, st["batches"]), 1)}


def run(clips_path: str, out: str | None, reps: int, dry_run: bool = False) -> int:
    import torch

    from engine.backends import attach_backend, swap_sessions
    from engine.backends.torch_backend import TorchSession
    from engine.understanding import UnderstandingModel

    if not torch.cuda.is_available() and not dry_run:
        sys.stderr.write("no CUDA device: this benchmark measures the GPU backend\n")
        return 2
    clips, labels = _load(clips_path)
    if dry_run and len(clips) > 24:  # the same steps on the CPU interpreter, few clips: checks this script
        clips, labels = clips[:12] + clips[-12:], labels[:12] + labels[-12:]
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if not dry_run else "cpu (dry run)",
                              "torch": torch.__version__, "cpu_count": os.cpu_count()}
    t0 = time.perf_counter()
    if dry_run:
        gpu = UnderstandingModel.load()
        swap_sessions(gpu, lambda p: TorchSession(p, device="cpu", pad_batches=True, device_features=True))
        gpu.backend_name = "torch"
    else:
        gpu = attach_backend(UnderstandingModel.load(), "torch")
    report["gpu_load_s"] = round(time.perf_counter() - t0, 2)
    report["backend"] = gpu.backend_name
    if gpu.backend_name != "torch":
        sys.stderr.write("the torch backend did not attach (see log)\n")
        return 3
    cpu = UnderstandingModel.load(threads=1)
    report["parity"] = _parity(cpu, gpu, clips, labels)
    four = _fixed(clips, 4.0)
    report["gpu_by_batch_4s"] = _sweep(gpu, four, [1, 8, 32, 64, 128] if not dry_run else [1, 3], reps)
    report["captured_graphs"] = len(gpu.session._graphs)
    if not dry_run:  # the same backend without CUDA graphs or device features: what they buy
        eager = UnderstandingModel.load()
        swap_sessions(eager, lambda p: TorchSession(p, device="cuda", cuda_graphs=False, device_features=False))
        report["gpu_eager_by_batch_4s"] = _sweep(eager, four, [1, 32], reps)
    report["cpu_onnx_1_thread_4s"] = _sweep(cpu, four, [1], max(20, reps // 2))
    report["gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if not dry_run else 0
    asyncio.run(_callers(gpu, clips, 16, 1, 64, 1))
    loads = ((64, 64, 1), (256, 64, 1), (256, 64, 2), (512, 128, 2)) if not dry_run else ((8, 4, 1),)
    report["concurrent"] = [asyncio.run(_callers(gpu, clips, c, 4, mb, w)) for c, mb, w in loads]
    paced = ((500, 5.0, 10.0, 2), (1000, 5.0, 10.0, 2), (2000, 5.0, 10.0, 2)) if not dry_run else ((8, 1.0, 2.0, 1),)
    report["paced"] = [asyncio.run(_paced(gpu, clips, c, e, d, w)) for c, e, d, w in paced]
    report["captured_graphs_after_load"] = len(gpu.session._graphs)
    report["gpu_memory_mib_after_load"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if not dry_run else 0
    text = json.dumps(report, indent=1)
    if out:
        Path(out).write_text(text)
    sys.stdout.write(text + "\n")
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="pack labelled eval clips into one .npz")
    p.add_argument("dirs", nargs="+")
    p.add_argument("--n", type=int, default=400, help="clips per directory")
    p.add_argument("--out", default=".gpu/clips.npz")
    r = sub.add_parser("run", help="parity + latency + concurrency on the GPU")
    r.add_argument("clips")
    r.add_argument("--out")
    r.add_argument("--reps", type=int, default=50)
    r.add_argument("--dry-run", action="store_true", help="run every step on the CPU with a few clips")
    a = ap.parse_args()
    if a.cmd == "pack":
        pack(a.dirs, a.n, a.out)
        return
    raise SystemExit(run(a.clips, a.out, a.reps, a.dry_run))


if __name__ == "__main__":
    main()
