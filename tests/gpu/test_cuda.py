"""The CUDA paths, for a machine with a GPU (CI has none: skipped there, run on a borrowed H200).

    python -m pytest tests/gpu -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model_path() -> str:
    from engine.understanding import default_model_dir

    return str(default_model_dir() / "model.onnx")


def test_cuda_graphs_capture_and_each_row_is_its_own() -> None:
    from engine.backends.torch_backend import TorchSession

    gpu, cpu = TorchSession(_model_path(), device="cuda"), TorchSession(_model_path(), device="cpu")
    rng = np.random.default_rng(1)
    mel = np.stack([rng.standard_normal((80, 300)).astype(np.float32) * g for g in (0.2, 1.0, 3.0)])
    batch = gpu.run(None, {"mel": mel})
    again = gpu.run(None, {"mel": mel})
    assert gpu.use_graphs and len(gpu._graphs) >= 1  # captured (a failed capture turns use_graphs off)
    ref = cpu.run(None, {"mel": mel})
    for i in range(3):
        alone = gpu.run(None, {"mel": mel[i : i + 1]})
        for b, a, r, c in zip(batch, alone, ref, again):
            assert b.shape[0] == 3 and np.array_equal(b, c)  # replay is deterministic
            if b.dtype.kind == "f":
                np.testing.assert_allclose(b[i], a[0], atol=0.02)  # FP16, batch vs alone
                np.testing.assert_allclose(b[i], r[i], atol=0.1)  # FP16 vs the CPU's FP32
    assert len(gpu._graphs) >= 2  # batch 1 and batch 4 (3 padded to a power of two)


def test_device_front_end_on_cuda_matches_numpy() -> None:
    from engine.backends.torch_features import TorchLogMel
    from engine.features import log_mel

    rng = np.random.default_rng(2)
    clips = [(rng.standard_normal(n) * 0.3).astype(np.float32) for n in (24000, 17000, 9000)]
    got = TorchLogMel(torch.device("cuda"))(clips, 3).cpu().numpy()
    for i, c in enumerate(clips):
        np.testing.assert_allclose(got[i], log_mel(c, 3), atol=2e-3)


def test_understanding_on_the_torch_backend() -> None:
    from engine.backends import attach_backend
    from engine.understanding import UnderstandingModel

    model = attach_backend(UnderstandingModel.load(), "auto")  # tensorrt absent: torch on CUDA
    assert model.backend_name in ("torch", "tensorrt")
    rng = np.random.default_rng(3)
    pcms = [(rng.standard_normal(8000 * s) * 3000).astype(np.int16) for s in (1, 2, 3, 9)]
    out = model.understand_batch(pcms)
    assert all(u.error is None and 0.0 <= u.confidence <= 1.0 for u in out)
    assert out[-1].timings["pieces"] == 2.0  # a 9 s turn read in two pieces


def test_training_runs_on_cuda_and_writes_cpu_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.training.train as T
    from engine.training.whisper import WhisperEncoder
    from ops.bench.gpu_train import intents, make_cache

    monkeypatch.setattr(T, "pretrained_encoder", WhisperEncoder)
    make_cache(tmp_path / "cache" / "train", 96, 0)
    make_cache(tmp_path / "cache" / "val", 32, 1)
    res = T.train(str(tmp_path / "cache"), str(tmp_path / "run"), intents(), epochs=1, device="cuda")
    assert res["history"] and (tmp_path / "run" / "best.pt").exists()
    ck = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert all(v.device.type == "cpu" for v in ck["model"].values())
