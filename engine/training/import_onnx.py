"""Rebuild a trainable checkpoint from a shipped model directory (its int8 ONNX graph).

Training runs live in gitignored data/ folders and are gone on a fresh checkout, while the shipped
model is committed. Reading its weights back (int8 MatMul weights dequantized with their per-channel
scales, float initializers as they are) lets anyone fine-tune further from the release itself
(`bot engine import-model`, then `bot engine train --init`). The result equals the shipped int8 model
up to float rounding; it is not the original float run (quantization is lossy, ~0.4 % per weight).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from engine.graphs import finest_graph
from engine.training.cache import FROZEN_LAYERS
from engine.training.model import FullModel, TopModel
from engine.training.whisper import pretrained_encoder


def _module_path(node_name: str) -> str:
    """'/heads/intent/intent.0/Gemm_MatMul_quant' -> 'heads.intent.0';
    '/encoder/layers.2/fc1/MatMul_quant' -> 'encoder.layers.2.fc1' (export scopes repeat the parent)."""
    out: list[str] = []
    for p in [p for p in node_name.split("/") if p][:-1]:
        if out and p.startswith(out[-1] + "."):
            out[-1] = p  # a Sequential member is scoped under its parent's name again
        else:
            out.append(p)
    return ".".join(out)


def onnx_state_dict(model_path: str | Path) -> dict[str, np.ndarray]:
    """Every weight of the exported graph under its PyTorch name (FullModel's state_dict keys)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(model_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    state: dict[str, np.ndarray] = {k: v for k, v in inits.items() if k[0].isalpha() and not k.startswith("onnx::")
                                    and not k.endswith(("_quantized", "_scale", "_zero_point"))}
    for n in g.node:
        if n.op_type == "MatMulInteger" and n.input[1] in inits:
            base = n.input[1][: -len("_quantized")]
            q = inits[n.input[1]].astype(np.float32)
            zp = inits[base + "_zero_point"].astype(np.float32)
            w = (q - zp) * inits[base + "_scale"].astype(np.float32)  # (in, out), per output channel
            state[_module_path(n.name) + ".weight"] = w.T.copy()
        elif n.op_type == "MatMul" and n.input[1] in inits:
            state[_module_path(n.name) + ".weight"] = inits[n.input[1]].T.copy()
    return state


def import_model(model_dir: str | Path, out_run: str | Path) -> dict:
    """Write out_run/best.pt (a TopModel checkpoint, like `train` writes) from model_dir's ONNX graph.
    The graph's frozen lower layers must equal the pretrained encoder's: they come from the cache."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    frozen = int(cfg.get("frozen_layers", FROZEN_LAYERS))
    intents = list(cfg["intents"])
    enc = pretrained_encoder()
    top = TopModel(enc, len(intents), frozen)
    full = FullModel(enc, top)
    ref = full.state_dict()
    state = onnx_state_dict(finest_graph(model_dir / "model.onnx"))  # the 8-bit graph's weights are the finer
    if "slot_blank_penalty" not in state:  # graphs before the penalty (or with it folded away): config says it
        state["slot_blank_penalty"] = ref["slot_blank_penalty"].numpy().copy()
        state["slot_blank_penalty"][0] = float(cfg.get("slot_blank_penalty", 0.0))
    for k in ("encoder.conv1.weight", "encoder.conv2.weight"):
        # exported as int8 MatMuls since 2026-11-30 (whisper.conv_as_matmul); the stem is always frozen and
        # read from the cache at training time, so the pretrained weights are the right ones
        state.setdefault(k, ref[k].numpy().copy())
    missing = sorted(set(ref) - set(state))
    if missing:
        raise ValueError(f"{model_dir}: the graph has no weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for k, v in ref.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{model_dir}: {k} has shape {state[k].shape}, the model expects {tuple(v.shape)}")
    full.load_state_dict({k: torch.from_numpy(np.array(state[k], dtype=np.float32)).reshape(v.shape)
                          for k, v in ref.items()})
    # the frozen layers are read from the cache at training time, so they must be the pretrained ones
    with torch.no_grad():
        drift = max(float((full.encoder.layers[i].fc1.weight - enc.layers[i].fc1.weight).abs().max()) for i in range(frozen))
    for i in range(frozen, len(full.encoder.layers)):
        top.layers[i - frozen].load_state_dict(full.encoder.layers[i].state_dict())
    top.layer_norm.load_state_dict(full.encoder.layer_norm.state_dict())
    top.heads.load_state_dict(full.heads.state_dict())
    out = Path(out_run)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"source": str(model_dir), "temperature": float(state["temperature"]),
            "slot_blank_penalty": float(np.asarray(state["slot_blank_penalty"]).reshape(-1)[0]),
            "frozen_layer_max_drift": drift}
    torch.save({"model": top.state_dict(), "intents": intents, "epoch": None, "frozen_layers": frozen,
                "imported": meta}, out / "best.pt")
    # The release's calibration goes with its weights: `export` of this run (without a new `calibrate`)
    # must give back a calibrated model, and `calibrate` compares its fit against this one.
    (out / "calibration.json").write_text(json.dumps(
        {"temperature": meta["temperature"], "slot_blank_penalty": meta["slot_blank_penalty"],
         "split": f"imported from {model_dir}"}, indent=1))
    return meta
