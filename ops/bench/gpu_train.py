"""Training speed by device: one epoch of `engine.training.train` on a cache of N clips, CPU vs CUDA.

The cache is synthetic (random hidden states of the real shapes: 2-4 s buckets, 50 frames/s x 384,
with real label texts), because a GPU machine may not hold our synthesized data; the time per step
does not depend on the values. With --random-encoder the encoder starts from random weights (no
pipecat needed there); the work per step is the same.

    python -m ops.bench.gpu_train --n 16000 --device cuda --random-encoder --out report.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.understanding import default_model_dir

TEXTS = [("i want to pay forty two dollars", "pay_bill"), ("my internet is down again", "report_outage"),
         ("can someone come out on tuesday", "schedule_technician"), ("yes that's right", "affirm"),
         ("no", "deny"), ("let me talk to a person", "speak_to_agent"), ("five five two one nine", None),
         ("what do i owe this month", "check_balance"), ("bye now", "goodbye"), ("say that again", "repeat")]
MODEL_DIR = default_model_dir()


def intents() -> list[str]:
    return [i for i in json.loads((MODEL_DIR / "config.json").read_text())["intents"] if i != "<null>"]


def make_cache(dst: Path, n: int, seed: int, frozen_layers: int = 1) -> None:
    """A cache split in engine.training.cache's format: b<S>.npy (N, 50*S, 384) fp16 + index.json."""
    rng = np.random.default_rng(seed)
    dst.mkdir(parents=True, exist_ok=True)
    rows, buckets = [], {}
    for i in range(n):
        text, intent = TEXTS[i % len(TEXTS)]
        truncated = "cut" if rng.random() < 0.2 else None
        rows.append({"audio": f"{i}.wav", "text": text, "intent": intent, "truncated": truncated,
                     "frustration": int(rng.random() < 0.2), "eot": 0 if truncated else 1, "voice": "espeak:en+m1"})
        buckets.setdefault(int(rng.integers(2, 5)), []).append(i)
    for s, idx in buckets.items():
        np.save(dst / f"b{s}.npy", rng.standard_normal((len(idx), 50 * s, 384)).astype(np.float16))
    (dst / "index.json").write_text(json.dumps({"buckets": {str(s): idx for s, idx in buckets.items()}, "rows": rows,
                                                "frozen_layers": frozen_layers}))


def run(n: int, device: str, epochs: int = 1, random_encoder: bool = False, n_val: int = 256,
        workdir: str | None = None) -> dict[str, Any]:
    import torch

    import engine.training.train as T
    from engine.training.whisper import WhisperEncoder

    if random_encoder:
        T.pretrained_encoder = WhisperEncoder  # same shapes and work, no smart-turn file needed
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "run"
        make_cache(cache / "train", n, 0)
        make_cache(cache / "val", n_val, 1)
        t0 = time.perf_counter()
        res = T.train(str(cache), str(out), intents(), epochs=epochs, max_minutes=1e9, device=device,
                      threads=torch.get_num_threads())
        elapsed = time.perf_counter() - t0
        ck = torch.load(out / "best.pt", weights_only=False)  # no map_location: CPU tensors either way
        on_cpu = all(v.device.type == "cpu" for v in ck["model"].values())
    dev = T.resolve_device(device)
    return {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}",
            "clips": n, "epochs": epochs, "seconds": round(elapsed, 2),
            "clips_per_s": round(n * epochs / elapsed, 1), "history": res["history"], "checkpoint_on_cpu": on_cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--random-encoder", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    r = run(a.n, a.device, a.epochs, a.random_encoder)
    text = json.dumps(r, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
