"""Paired comparison of two models on one evaluation set, with bootstrap confidence intervals.

Release rules like "validation slots not below the shipped model" are decided on a few hundred clips, where one
clip moves a rate by 0.5 points. Scoring both models on the same clips and resampling the clips (paired
bootstrap) says whether a difference is larger than that noise: a candidate is worse only when the upper end
of its interval is below zero.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from engine.training.evaluate import _slots_equal, load_wav, read_eval_manifest
from engine.understanding import UnderstandingModel


def paired_bootstrap(a: np.ndarray, b: np.ndarray, reps: int = 2000, seed: int = 0) -> dict:
    """b - a for per-item scores (0/1) of the same items: mean difference and a 95 % percentile interval."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("paired scores must be two 1-D arrays of the same length")
    if len(a) == 0:
        return {"n": 0, "a": None, "b": None, "diff": None, "ci95": None, "changed": 0}
    rng = np.random.default_rng(seed)
    d = b - a
    idx = rng.integers(0, len(d), size=(reps, len(d)))
    boot = d[idx].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"n": int(len(d)), "a": round(float(a.mean()), 4), "b": round(float(b.mean()), 4),
            "diff": round(float(d.mean()), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "changed": int((d != 0).sum())}


def compare(eval_dir: str | Path, model_a: str | None, model_b: str, reps: int = 2000, limit: int | None = None,
            progress: bool = True) -> dict:
    """Run both models on every non-truncated clip of eval_dir; paired intent and slot results."""
    d = Path(eval_dir)
    ma, mb = UnderstandingModel.load(model_a, threads=1), UnderstandingModel.load(model_b, threads=1)
    # labels read as `eval` reads them: hand-written values normalised ("$40.00" -> 40.0), unknown names refused
    rows = [r for _, r in read_eval_manifest(d, intents=ma.intents, slot_types=ma.slot_types)
            if not r.get("truncated")][:limit]
    intent = np.zeros((2, len(rows)))
    slots: list[tuple[float, float]] = []
    for i, r in enumerate(tqdm(rows, desc="compare", unit="utt", disable=not progress)):
        pcm = load_wav(d / r["audio"])
        ua, ub = ma.understand(pcm), mb.understand(pcm)
        intent[0, i], intent[1, i] = str(ua.intent) == str(r["intent"]), str(ub.intent) == str(r["intent"])
        if r.get("slots"):
            slots.append((float(_slots_equal(r["slots"], ua.slots)), float(_slots_equal(r["slots"], ub.slots))))
    s = np.array(slots).reshape(-1, 2)
    return {"eval_dir": str(d), "a": model_a or "packaged", "b": model_b,
            "intent_accuracy": paired_bootstrap(intent[0], intent[1], reps),
            "slot_accuracy": paired_bootstrap(s[:, 0], s[:, 1], reps)}
