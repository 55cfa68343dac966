"""`bot engine refreeze`: a run laid out for training more layers computes exactly what it did."""

from pathlib import Path

import pytest
import torch

from engine.training.model import FullModel, TopModel
from engine.training.whisper import pretrained_encoder
from engine.training.wise import refreeze


def test_refreeze_keeps_the_full_model_identical(tmp_path: Path) -> None:
    enc = pretrained_encoder()
    top = TopModel(enc, 5, 1)
    with torch.no_grad():
        for p in top.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # "trained"
    (tmp_path / "run").mkdir()
    torch.save({"model": top.state_dict(), "intents": list("abcd") + ["<null>"], "frozen_layers": 1}, tmp_path / "run" / "best.pt")
    meta = refreeze(tmp_path / "run", tmp_path / "f0", 0)
    assert meta["frozen_layers_before"] == 1 and meta["frozen_layers"] == 0
    ck = torch.load(tmp_path / "f0" / "best.pt", weights_only=False)
    top0 = TopModel(enc, 5, 0)
    top0.load_state_dict(ck["model"])
    assert len(top0.layers) == len(top.layers) + 1
    mel = torch.randn(2, 80, 200)
    a, b = FullModel(enc, top).eval(), FullModel(enc, top0).eval()
    with torch.no_grad():
        for x, y in zip(a(mel), b(mel)):
            assert torch.equal(x, y)
    with pytest.raises(ValueError, match="drop trained weights"):
        refreeze(tmp_path / "f0", tmp_path / "f2", 2)
