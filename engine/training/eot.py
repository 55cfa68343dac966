"""End of turn: our head vs pipecat's smart-turn v3.2 on the same 8 kHz clips (complete vs truncated)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.features import resample
from engine.training.evaluate import load_wav, read_eval_dir
from engine.understanding import UnderstandingModel


class SmartTurn:
    """pipecat's LocalSmartTurnAnalyzerV3 inference path: 16 kHz, last 8 s, zero-padded at the start."""

    def __init__(self) -> None:
        import onnxruntime as ort
        from pipecat.audio.turn.smart_turn._whisper_features import compute_whisper_log_mel_features

        from engine.training.whisper import smart_turn_onnx_path

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(str(smart_turn_onnx_path()), so, providers=["CPUExecutionProvider"])
        self.feat = compute_whisper_log_mel_features

    def __call__(self, pcm: np.ndarray) -> float:
        x = resample(pcm.astype(np.float32) / 32768.0, 8000, 16000)[-128000:]
        x = np.pad(x, (128000 - len(x), 0))
        f = self.feat(x)[None]
        return float(self.sess.run(None, {"input_features": f})[0].reshape(-1)[0])


def compare(eval_dir: str | Path, model_dir: str | None = None, limit: int | None = None) -> dict:
    d = Path(eval_dir)
    rows = [r for r in read_eval_dir(d) if "eot" in r][:limit]
    ours, st = UnderstandingModel.load(model_dir, threads=1), SmartTurn()
    res: dict[str, dict] = {}
    for name, fn in (("ours", lambda p: ours.end_of_turn_batch([p])[0]), ("smart_turn_v3_2", st)):
        probs, lat = [], []
        for r in tqdm(rows, desc=f"eot {name}", unit="utt"):
            pcm = load_wav(d / r["audio"])
            t = time.perf_counter()
            probs.append(fn(pcm))
            lat.append((time.perf_counter() - t) * 1000)
        y = np.array([r["eot"] for r in rows]) > 0.5
        p = np.array(probs) > 0.5
        res[name] = {
            "complete_called_complete": round(float(p[y].mean()), 4),
            "truncated_called_incomplete": round(float((~p[~y]).mean()), 4),
            "accuracy": round(float((p == y).mean()), 4),
            "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2), "p95": round(float(np.percentile(lat, 95)), 2)},
        }
    res["n"] = {"complete": int(sum(r["eot"] > 0.5 for r in rows)), "truncated": int(sum(r["eot"] <= 0.5 for r in rows))}
    return res
