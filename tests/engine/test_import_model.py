"""`bot engine import-model`: a trainable checkpoint rebuilt from the shipped int8 ONNX graph."""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.training.export import onnx_outputs, torch_outputs  # noqa: E402
from engine.training.import_onnx import _module_path, import_model  # noqa: E402
from engine.training.model import FullModel, TopModel  # noqa: E402
from engine.training.whisper import pretrained_encoder  # noqa: E402
from engine.understanding import default_model_dir  # noqa: E402


def test_module_paths_from_export_scopes() -> None:
    assert _module_path("/encoder/layers.2/fc1/MatMul_quant") == "encoder.layers.2.fc1"
    assert _module_path("/heads/intent/intent.0/Gemm_MatMul_quant") == "heads.intent.0"
    assert _module_path("/heads/slot_ctc/MatMul") == "heads.slot_ctc"


def test_imported_run_reproduces_the_shipped_graph(tmp_path: Path) -> None:
    model_dir = default_model_dir()
    meta = import_model(model_dir, tmp_path / "run")
    ck = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    # the frozen layers are the pretrained ones up to 7-bit weight rounding (a trained layer drifts far more)
    assert ck["intents"][-1] == "<null>" and meta["frozen_layer_max_drift"] < 5e-3
    # the release's calibration comes with the run, so exporting it (or calibrating against it) starts there
    cfg = json.loads((model_dir / "config.json").read_text())
    cal = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert abs(cal["temperature"] - cfg["temperature"]) < 1e-4
    assert abs(cal["slot_blank_penalty"] - cfg["slot_blank_penalty"]) < 1e-4
    enc = pretrained_encoder()
    top = TopModel(enc, len(ck["intents"]), ck["frozen_layers"])
    top.load_state_dict(ck["model"])  # strict: every weight came back, with its shape
    full = FullModel(enc, top, meta["temperature"]).eval()
    # real speech-like input: log-mel of a few rendered words through the runtime's features
    from engine.features import features_batch, prepare_pcm

    rng = np.random.default_rng(0)
    t = np.arange(int(2.5 * 8000)) / 8000
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t * (1 + 0.2 * np.sin(3 * t))) * 32767 * (rng.random(len(t)) > 0.3))
    mel, _ = features_batch([prepare_pcm(pcm.astype(np.int16))])
    pt, ox = torch_outputs(full, mel), onnx_outputs(model_dir / "model.onnx", mel)
    # this tone is no intent (the top three are within 0.02), so the top may flip between near-ties; what must
    # hold is that PyTorch's top intent is (near) the top in the graph too
    top = pt[0].argmax(-1)
    assert (ox[0][np.arange(len(top)), top] >= ox[0].max(-1) - 0.05).all()
    assert float(np.abs(pt[0] - ox[0]).max()) < 0.05
    assert (pt[4] == ox[4]).mean() > 0.95  # transcript-head frames agree
