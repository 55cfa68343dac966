"""Export the trained model to ONNX (dynamic batch/time axes), int8-quantize it, write the model dir."""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from engine.graphs import PORTABLE_FILE as MODEL_FILE
from engine.graphs import VNNI_FILE
from engine.textnorm import CHARS, SLOT_TOKENS
from engine.training.model import OUTPUT_NAMES, FullModel

CONFIG_FILE = "config.json"


def export_onnx(model: FullModel, path: str | Path, seconds: int = 2) -> None:
    """The graph with its conv stem written as MatMuls (whisper.conv_as_matmul), so quantize() covers it."""
    model.eval()
    mel = torch.randn(2, 80, 100 * seconds)
    model.encoder.stem_as_matmul = True
    try:
        with warnings.catch_warnings():  # the stride-2 views cannot be constant-folded; harmless
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
            torch.onnx.export(
                model, (mel,), str(path), input_names=["mel"], output_names=OUTPUT_NAMES,
                dynamic_axes={"mel": {0: "batch", 2: "frames"}, **{n: {0: "batch"} for n in OUTPUT_NAMES[:3]},
                              "slot_ids": {0: "batch", 1: "steps"}, "char_ids": {0: "batch", 1: "steps"}},
                opset_version=17, dynamo=False,
            )
    finally:
        model.encoder.stem_as_matmul = False


# what quantize() does to the weights of each graph, recorded in each exported model's config.json
WEIGHT_QUANTIZATION = "int8 per-channel, 7-bit range (reduce_range): no int16 saturation on CPUs without VNNI"
WEIGHT_QUANTIZATION_VNNI = "int8 per-channel, full 8-bit range: for x86 CPUs with VNNI (int32 accumulation)"


def quantize(src: str | Path, dst: str | Path, reduce_range: bool = True) -> None:
    """Dynamic int8 for the encoder's weight MatMuls/Gemms, the conv stem's included (3x smaller, ~3x faster
    on CPU).

    Per-channel weight scales, and the small heads stay float: measured on understand-v1's validation
    clips, per-tensor int8 changed the top intent vs the float graph on 5.7 % of clips, per-channel
    with float heads on 1.7 %, at the same speed (attention's activation x activation MatMuls stay
    float too)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    heads = [n.name for n in onnx.load(str(src)).graph.node if n.name.startswith("/heads/")]
    # the quantizer rewrites a Gemm as "<name>_MatMul" + Add before it checks the exclusions, so a Gemm is
    # kept float only under its rewritten name too (up to understand-v6 the heads' Gemms were int8)
    heads += [h + "_MatMul" for h in heads if h.endswith("/Gemm")]
    # reduce_range: 7-bit weights. On x86 CPUs without VNNI (AVX2 only: many AMD EPYC and older Xeon hosts)
    # ONNX Runtime's u8 x s8 kernel (vpmaddubsw) sums pairs of products into int16 and saturates with full
    # 8-bit weights: there the 8-bit graph agreed with its own float weights on only 80 % of test clips
    # (intent 0.783 vs 0.870 on 300 clips), the 7-bit one read 0.863, at the same speed (u8 x u8 weights
    # read 0.873 but ran 1.5x slower). VNNI CPUs never saturate and lose the 8th bit for nothing, so the
    # export also writes a full 8-bit graph (reduce_range=False) that engine.graphs picks on them.
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                     per_channel=True, reduce_range=reduce_range, nodes_to_exclude=heads,
                     extra_options={"MatMulConstBOnly": True})


def torch_outputs(model: FullModel, mel: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in model.eval()(torch.from_numpy(mel))]


def onnx_outputs(path: str | Path, mel: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(OUTPUT_NAMES, {"mel": mel.astype(np.float32)})


def write_model_dir(model: FullModel, out_dir: str | Path, intents: list[str], intent_slots: dict[str, list[str]],
                    slot_types: dict[str, str], extra: dict | None = None, quantized: bool = True) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        fp32 = Path(td) / "fp32.onnx"
        export_onnx(model, fp32)
        if quantized:
            quantize(fp32, out / MODEL_FILE)
            quantize(fp32, out / VNNI_FILE, reduce_range=False)
        else:
            shutil.copy(fp32, out / MODEL_FILE)
            (out / VNNI_FILE).unlink(missing_ok=True)  # a float dir has one graph, for every CPU
    cfg = {
        "format": 1,
        "intents": intents,  # last one is "<null>": a slot-only answer
        "intent_slots": intent_slots,
        "slot_types": slot_types,
        "slot_tokens": SLOT_TOKENS,
        "chars": CHARS,
        "temperature": float(model.temperature),
        "slot_blank_penalty": float(model.slot_blank_penalty[0]),
        "quantized": quantized,
        "weight_quantization": WEIGHT_QUANTIZATION if quantized else "float32",  # of MODEL_FILE
        **({"vnni_weight_quantization": WEIGHT_QUANTIZATION_VNNI} if quantized else {}),  # of VNNI_FILE
        **(extra or {}),
    }
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=1))
    return out
