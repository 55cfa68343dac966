"""`bot engine train` on a small cache: checkpoints, resume, and weights that load on any device."""

from pathlib import Path

import pytest
import torch

import engine.training.train as T
from engine.training.whisper import WhisperEncoder
from ops.bench.gpu_train import intents, make_cache


def test_train_checkpoints_resumes_and_writes_cpu_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "pretrained_encoder", WhisperEncoder)  # the loop is under test, not the weights
    make_cache(tmp_path / "cache" / "train", 48, 0)
    make_cache(tmp_path / "cache" / "val", 24, 1)
    run = tmp_path / "run"
    first = T.train(str(tmp_path / "cache"), str(run), intents(), epochs=1, bs=16, device="cpu", threads=1)
    assert [h["epoch"] for h in first["history"]] == [1]
    assert (run / "best.pt").exists() and (run / "last.pt").exists()
    second = T.train(str(tmp_path / "cache"), str(run), intents(), epochs=2, bs=16, device="cpu", threads=1)
    assert [h["epoch"] for h in second["history"]] == [1, 2]  # resumed from last.pt, not restarted
    ck = torch.load(run / "best.pt", weights_only=False)
    assert all(v.device.type == "cpu" for v in ck["model"].values())
    assert ck["intents"][-1] == T.NULL and ck["frozen_layers"] == 1


def test_device_names() -> None:
    assert T.resolve_device("cpu").type == "cpu"
    assert T.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA"):
            T.resolve_device("cuda")
