"""Weight-space ensembling with the pretrained encoder (WiSE-FT, Wortsman et al. 2022).

Fine-tuning the encoder on synthetic voices fits their acoustics; moving the fine-tuned encoder
layers part of the way back to the pretrained (real-speech) weights keeps most of the task gain and
restores robustness to real voices. The final norm and the heads are kept as trained. Measured on
understand-v3's layer-1-3 weights (docs/engine.md): 30 % of the way back took synthetic held-out intent
0.796 -> 0.769 and real-speech (asterisk) intent 0.865 -> 0.955, slot exact match 0.267 -> 0.467.
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
    ck = torch.load(Path(run) / "best.pt", weights_only=False)
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
