"""The export code path (PyTorch -> ONNX with dynamic batch/time) on a tiny randomly initialised model."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.training.export import export_onnx, onnx_outputs, quantize, torch_outputs  # noqa: E402
from engine.training.model import FullModel, TopModel  # noqa: E402
from engine.training.whisper import WhisperEncoder, conv_as_matmul  # noqa: E402


@pytest.mark.parametrize("stride,frames", [(1, 400), (1, 37), (2, 400), (2, 37)])
def test_conv_stem_as_matmul_is_the_same_conv(stride: int, frames: int) -> None:
    torch.manual_seed(stride)
    conv = torch.nn.Conv1d(16, 24, 3, stride=stride, padding=1)
    x = torch.randn(2, 16, frames)
    with torch.no_grad():
        ref, got = conv(x).transpose(1, 2), conv_as_matmul(conv, x)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        conv_as_matmul(torch.nn.Conv1d(16, 24, 5, padding=2), x)


def test_onnx_matches_pytorch_on_dynamic_shapes(tmp_path) -> None:
    torch.manual_seed(0)
    enc = WhisperEncoder()
    with torch.no_grad():
        enc.embed_positions.normal_(0, 0.02)
    model = FullModel(enc, TopModel(enc, n_intents=5, frozen_layers=3), temperature=1.7, slot_blank_penalty=1.5).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    rng = np.random.default_rng(0)
    for batch, seconds in ((1, 1), (3, 4), (2, 8)):  # shapes differ from the export example
        mel = rng.standard_normal((batch, 80, 100 * seconds)).astype(np.float32) * 0.5
        pt, ox = torch_outputs(model, mel), onnx_outputs(path, mel)
        assert ox[0].shape == (batch, 5)
        np.testing.assert_allclose(ox[0], pt[0], atol=1e-4)  # calibrated intent probabilities
        np.testing.assert_allclose(ox[1], pt[1], atol=1e-4)  # frustration
        np.testing.assert_allclose(ox[2], pt[2], atol=1e-4)  # end of turn
        assert ox[3].shape == (batch, 50 * seconds)
        # slot ids come from the penalised logits in both (a random model puts blank and words close)
        assert (ox[3] == pt[3]).mean() > 0.99
    q = tmp_path / "q.onnx"
    quantize(path, q)
    assert q.stat().st_size < path.stat().st_size / 2
    import onnx

    int8 = [n.name for n in onnx.load(str(q)).graph.node if n.op_type == "MatMulInteger"]
    assert int8 and not [n for n in int8 if n.startswith("/heads/")]  # encoder int8, heads float
    assert len(int8) == 2 + 6 * 4  # the conv stem too: two MatMuls instead of two float Convs
    assert not [n for n in onnx.load(str(q)).graph.node if n.op_type == "Conv"]
    assert not model.encoder.stem_as_matmul  # export left the model as it found it
    mel = rng.standard_normal((2, 80, 300)).astype(np.float32) * 0.5
    assert np.abs(onnx_outputs(q, mel)[0] - torch_outputs(model, mel)[0]).max() < 0.1


def test_slot_blank_penalty_is_in_the_graph(tmp_path) -> None:
    torch.manual_seed(1)
    enc = WhisperEncoder()
    top = TopModel(enc, n_intents=5, frozen_layers=3)
    mel = np.random.default_rng(1).standard_normal((1, 80, 200)).astype(np.float32) * 0.5
    plain, pen = FullModel(enc, top).eval(), FullModel(enc, top, slot_blank_penalty=50.0).eval()
    with torch.no_grad():
        logits = plain.heads(plain.encoder(torch.from_numpy(mel), upto=4))["slot"][0].numpy()
    path = tmp_path / "p.onnx"
    export_onnx(pen, path)
    ids = onnx_outputs(path, mel)[3][0]
    assert (ids != 0).all()  # a penalty that large: the blank never wins
    assert (ids == logits[:, 1:].argmax(-1) + 1).mean() > 0.99
    assert (torch_outputs(plain, mel)[3][0] == logits.argmax(-1)).all()  # no penalty: plain argmax


def test_int8_weights_cannot_saturate_on_cpus_without_vnni() -> None:
    """On AVX2-only x86 CPUs ONNX Runtime multiplies u8 activations by s8 weights with vpmaddubsw, which
    adds pairs of products in int16: 2 x 255 x 128 overflows, 2 x 255 x 64 does not. The 8-bit graph read
    0.783 instead of 0.870 on such a CPU (engine/training/export.py); the shipped graph must use 7-bit weights."""
    import onnx
    from onnx import numpy_helper

    from engine.understanding import default_model_dir

    graph = onnx.load(str(default_model_dir() / "model.onnx")).graph
    weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(weights) >= 20  # every encoder MatMul, the conv stem's included
    assert all(int(np.abs(w.astype(np.int32)).max()) <= 64 for w in weights)
    import json

    from engine.training.export import WEIGHT_QUANTIZATION

    assert json.loads((default_model_dir() / "config.json").read_text())["weight_quantization"] == WEIGHT_QUANTIZATION
