"""Weight-space ensembling: with the pretrained encoder (WiSE-FT, Wortsman et al. 2022) and between
fine-tuned runs of one lineage (model soups, Wortsman et al. 2022).

Fine-tuning the encoder on synthetic voices fits their acoustics; moving the fine-tuned encoder
layers part of the way back to the pretrained (real-speech) weights keeps most of the task gain and
restores robustness to real voices. The final norm and the heads are kept as trained. Measured on
understand-v3's layer-1-3 weights (docs/engine.md): 30 % of the way back took synthetic held-out intent
0.796 -> 0.769 and real-speech (asterisk) intent 0.865 -> 0.955, slot exact match 0.267 -> 0.467.

A soup averages every weight (heads included) of runs that were fine-tuned from the same starting
point, so they sit in one basin and their average is a working model (runs of unrelated lineages do
not average: tried with v2 and v3, their CTC heads broke).
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.training.cache import frozen_layers_of
from engine.training.model import TopModel
from engine.training.whisper import pretrained_encoder


def toward_pretrained(run: str | Path, out: str | Path, beta: float) -> dict:
    """Write out/best.pt: run's best.pt with every trained encoder-layer weight w replaced by
    (1 - beta) * w + beta * w_pretrained. beta=0 is the fine-tuned model, 1 the pretrained encoder."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    ck = torch.load(Path(run) / "best.pt", weights_only=False, map_location="cpu")
    frozen = frozen_layers_of(ck)
    pre = TopModel(pretrained_encoder(), len(ck["intents"]), frozen).state_dict()
    mixed = {}
    for k, w in ck["model"].items():
        # the trained transformer layers only: the final norm and the heads stay as trained
        mixed[k] = (1 - beta) * w + beta * pre[k] if k.startswith("layers.") and w.is_floating_point() else w
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"source": str(run), "source_epoch": ck.get("epoch"), "beta_pretrained": beta}
    torch.save({"model": mixed, "intents": ck["intents"], "epoch": ck.get("epoch"), "frozen_layers": frozen,
                "wise_ft": meta}, out / "best.pt")
    return meta


def soup(runs: list[str | Path], out: str | Path, weights: list[float] | None = None) -> dict:
    """Write out/best.pt: the weighted average of every floating-point weight of the runs' best.pt
    (uniform by default). The runs must share intents and frozen layers."""
    if len(runs) < 2:
        raise ValueError("a soup needs at least two runs")
    weights = [1.0 / len(runs)] * len(runs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(runs) or min(weights) < 0 or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"weights must be one non-negative number per run summing to 1, got {weights}")
    cks = [torch.load(Path(r) / "best.pt", weights_only=False, map_location="cpu") for r in runs]
    first = cks[0]
    for r, ck in zip(runs[1:], cks[1:]):
        if ck["intents"] != first["intents"] or frozen_layers_of(ck) != frozen_layers_of(first) \
                or ck["model"].keys() != first["model"].keys():
            raise ValueError(f"{r} does not match {runs[0]} (intents / frozen layers / weights differ)")
    mixed = {k: sum(w * ck["model"][k] for w, ck in zip(weights, cks)) if v.is_floating_point() else v
             for k, v in first["model"].items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"soup": [str(r) for r in runs], "weights": weights}
    torch.save({"model": mixed, "intents": first["intents"], "epoch": first.get("epoch"),
                "frozen_layers": frozen_layers_of(first), "soup": meta}, out / "best.pt")
    return meta


def refreeze(run: str | Path, out: str | Path, frozen_layers: int) -> dict:
    """Write out/best.pt: run's best.pt laid out for training with fewer frozen layers (more of the encoder
    trained). Trained layers keep their weights under their new index; the layers that become trainable
    start from the pretrained encoder, which is exactly what the old model computed below its split."""
    ck = torch.load(Path(run) / "best.pt", weights_only=False, map_location="cpu")
    old = frozen_layers_of(ck)
    if frozen_layers > old:
        raise ValueError(f"{run} trained layers from {old} up; freezing {frozen_layers} would drop trained weights")
    new = TopModel(pretrained_encoder(), len(ck["intents"]), frozen_layers).state_dict()
    for k, w in ck["model"].items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            k = f"layers.{int(i) + old - frozen_layers}.{rest}"
        if k not in new or new[k].shape != w.shape:
            raise ValueError(f"{run}: weight {k} does not fit a model with {frozen_layers} frozen layers")
        new[k] = w
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"source": str(run), "frozen_layers_before": old, "frozen_layers": frozen_layers}
    torch.save({"model": new, "intents": ck["intents"], "epoch": ck.get("epoch"), "frozen_layers": frozen_layers,
                "refreeze": meta}, out / "best.pt")
    return meta
