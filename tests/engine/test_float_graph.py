"""The int8 graph rewritten as a float graph for TensorRT (which parses no MatMulInteger): checked on CPU."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine.backends.float_graph import INTEGER_OPS, FloatGraphError, float_graph, float_graph_bytes
from engine.understanding import default_model_dir

torch = pytest.importorskip("torch")


def _run(model: bytes | str, mel: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"mel": mel})


def test_rewrite_recovers_the_float_model_it_was_quantized_from(tmp_path: Path) -> None:
    from engine.training.export import export_onnx, quantize
    from engine.training.model import FullModel, TopModel
    from engine.training.whisper import WhisperEncoder

    torch.manual_seed(0)
    enc = WhisperEncoder()
    with torch.no_grad():
        enc.embed_positions.normal_(0, 0.02)
    model = FullModel(enc, TopModel(enc, n_intents=5, frozen_layers=3), temperature=1.3).eval()
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_onnx(model, fp32)
    quantize(fp32, int8)
    rewritten = float_graph(onnx.load(str(int8)))
    onnx.checker.check_model(rewritten)
    ops = {n.op_type for n in rewritten.graph.node}
    assert not ops & set(INTEGER_OPS) and "MatMul" in ops
    mel = np.random.default_rng(0).standard_normal((3, 80, 300)).astype(np.float32) * 0.5
    ref, q, f = _run(str(fp32), mel), _run(str(int8), mel), _run(rewritten.SerializeToString(), mel)
    err_int8, err_float = np.abs(q[0] - ref[0]).max(), np.abs(f[0] - ref[0]).max()
    # only the weights' rounding is left (7-bit since the AVX2 fix, so it is about as large as the
    # activations' quantization error that the int8 graph adds on top of it)
    assert err_float < 5e-3 and err_float < 1.5 * err_int8
    assert [o.shape for o in f] == [o.shape for o in ref]


def test_shipped_model_as_a_float_graph_reads_like_the_int8_one(tmp_path: Path) -> None:
    from engine.backends.torch_backend import TorchSession
    from engine.features import features_batch, prepare_pcm

    path = default_model_dir() / "model.onnx"
    blob = float_graph_bytes(path)
    assert not {n.op_type for n in onnx.load_from_string(blob).graph.node} & set(INTEGER_OPS)
    rng = np.random.default_rng(0)
    clips = []
    for f0 in (110, 180, 240):  # voiced, gated, speech-like input of 2.5 s
        t = np.arange(int(2.5 * 8000)) / 8000
        clips.append((0.3 * np.sin(2 * np.pi * f0 * t * (1 + 0.2 * np.sin(3 * t))) * 32767 * (rng.random(len(t)) > 0.3)).astype(np.int16))
    mel, _ = features_batch([prepare_pcm(c) for c in clips])
    q, f = _run(str(path), mel), _run(blob, mel)
    assert f[0].argmax(-1).tolist() == q[0].argmax(-1).tolist()
    assert np.abs(f[0] - q[0]).max() < 0.05
    (tmp_path / "float.onnx").write_bytes(blob)  # the torch interpreter reads it too
    t = TorchSession(str(tmp_path / "float.onnx"), device="cpu").run(None, {"mel": mel})
    np.testing.assert_allclose(t[0], f[0], atol=1e-4)


def test_an_integer_chain_it_does_not_know_is_refused() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [2, 3])
    w = numpy_helper.from_array(np.ones((4, 3), np.int8), "w")
    node = helper.make_node("MatMulInteger", ["x", "w"], ["y"], name="bare")  # no DynamicQuantizeLinear before it
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], [w]))
    with pytest.raises(FloatGraphError, match="bare"):
        float_graph(model)
