"""Sentence-embedding distillation (`train --distill-weight`): the real text teacher, the masked cosine loss,
and a training-only head that never reaches a shipped checkpoint."""

from pathlib import Path

import numpy as np
import pytest
import torch

import engine.training.train as T
from engine.training import teacher
from engine.training.whisper import WhisperEncoder
from ops.bench.gpu_train import intents, make_cache


def test_teacher_puts_two_wordings_of_one_request_together() -> None:
    e = teacher.embed_texts(["i'd like to pay my bill", "can i settle what i owe", "i forgot my password",
                             "i'd like to pay my bill"])
    assert e.shape == (4, teacher.DIM) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-4)
    assert np.allclose(e[0], e[3])  # one text, one embedding
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.1


def test_semantic_loss_is_cosine_distance_over_complete_clips() -> None:
    target = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    pred = target * 5.0  # scale does not matter, direction does
    pred[2] = -pred[2]  # a truncated clip's wrong direction must not count
    mask = torch.tensor([True, True, False])
    assert T.semantic_loss(pred, target, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert T.semantic_loss(pred, target, torch.tensor([False, False, True])).item() == pytest.approx(2.0, abs=1e-5)
    assert T.semantic_loss(pred, target, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_distilled_run_keeps_its_head_out_of_best_pt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "pretrained_encoder", WhisperEncoder)  # the loop is under test, not the weights
    cache = tmp_path / "cache"
    make_cache(cache / "train", 32, 0)
    make_cache(cache / "val", 16, 1)
    plain = tmp_path / "plain"
    T.train(str(cache), str(plain), intents(), epochs=1, bs=16, device="cpu", threads=1)

    run = tmp_path / "distilled"  # starts from a checkpoint that has no semantic head
    res = T.train(str(cache), str(run), intents(), epochs=1, bs=16, device="cpu", threads=1, init=str(plain),
                  distill_weight=1.0)
    assert "semantic" in res["history"][0]["train_losses"]
    assert np.load(cache / "train" / "teacher.npy").shape == (32, teacher.DIM)  # embedded once, beside the cache
    best = torch.load(run / "best.pt", weights_only=False)["model"]
    last = torch.load(run / "last.pt", weights_only=False)["model"]
    assert not any(k.startswith("semantic.") for k in best)  # export, soup, calibrate see the usual model
    assert any(k.startswith("semantic.") for k in last)  # a resumed run keeps training its head
    assert set(best) == set(torch.load(plain / "best.pt", weights_only=False)["model"])

    again = T.train(str(cache), str(tmp_path / "from_distilled"), intents(), epochs=1, bs=16, device="cpu", threads=1,
                    init=str(run))  # and a plain run starts from a distilled one
    assert again["history"][0]["epoch"] == 1


def test_init_refuses_weights_of_another_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "pretrained_encoder", WhisperEncoder)
    cache = tmp_path / "cache"
    make_cache(cache / "train", 16, 0)
    make_cache(cache / "val", 8, 1)
    bad = tmp_path / "bad"
    bad.mkdir()
    ck = {"model": {"heads.other.weight": torch.zeros(1)}, "intents": intents() + [T.NULL], "frozen_layers": 1}
    torch.save(ck, bad / "best.pt")
    with pytest.raises(SystemExit, match="does not fit"):
        T.train(str(cache), str(tmp_path / "run"), intents(), epochs=1, bs=16, device="cpu", threads=1, init=str(bad))
