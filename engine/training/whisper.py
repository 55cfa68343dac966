"""Whisper-tiny's encoder rebuilt in PyTorch, with weights dequantized from pipecat's smart-turn v3.2 ONNX.

The ONNX graph is int8 QDQ with anonymised MatMul weight names; each projection is identified from the
graph structure (which bias it feeds, and k_proj as the bias-less MatMul sharing q_proj's input).
Positional embeddings are sliced from the END of smart-turn's 400 positions so that, as in smart-turn
(which left-pads to 8 s), the last frame of speech always sits at the last position.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

D_MODEL = 384
N_HEADS = 6
N_LAYERS = 4
MAX_FRAMES = 400  # 8 s at 50 encoder frames/s


def smart_turn_onnx_path() -> Path:
    import pipecat.audio.turn.smart_turn as st  # training-time only

    return Path(st.__file__).parent / "data" / "smart-turn-v3.2-cpu.onnx"


class EncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(D_MODEL)
        self.q_proj = nn.Linear(D_MODEL, D_MODEL)
        self.k_proj = nn.Linear(D_MODEL, D_MODEL, bias=False)
        self.v_proj = nn.Linear(D_MODEL, D_MODEL)
        self.out_proj = nn.Linear(D_MODEL, D_MODEL)
        self.final_layer_norm = nn.LayerNorm(D_MODEL)
        self.fc1 = nn.Linear(D_MODEL, 4 * D_MODEL)
        self.fc2 = nn.Linear(4 * D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.self_attn_layer_norm(x)
        q = self.q_proj(h).view(b, t, N_HEADS, -1).transpose(1, 2)
        k = self.k_proj(h).view(b, t, N_HEADS, -1).transpose(1, 2)
        v = self.v_proj(h).view(b, t, N_HEADS, -1).transpose(1, 2)
        attn_mask = None
        if key_mask is not None:  # (B, T) True = real frame
            attn_mask = key_mask[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.out_proj(a.transpose(1, 2).reshape(b, t, D_MODEL))
        h = self.final_layer_norm(x)
        return x + self.fc2(F.gelu(self.fc1(h)))


def conv_as_matmul(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A Conv1d of kernel 3 and padding 1, (B, C, T) -> (B, T', O), as one MatMul over three shifted views.

    The same numbers as the Conv (float rounding apart), written so that the exported graph holds a weight
    MatMul: ONNX Runtime's dynamic int8 quantizer covers MatMuls, and its int8 Conv (ConvInteger) was
    slower than the float Conv (4 s turn: model 20.7 ms vs 15.9 ms), while as MatMuls the stem costs
    14.2 ms. Only the export uses it; training keeps the Conv."""
    if conv.kernel_size != (3,) or conv.padding != (1,):
        raise ValueError("conv_as_matmul handles kernel 3, padding 1")
    stride = conv.stride[0]
    t_out = (x.shape[-1] - 1) // stride + 1
    xp = F.pad(x, (1, 1))
    views = [xp[:, :, k : k + stride * (t_out - 1) + 1 : stride] for k in range(3)]
    w = conv.weight.permute(2, 1, 0).reshape(-1, conv.out_channels)  # (3C, O): kernel tap major, like the views
    return torch.cat(views, 1).transpose(1, 2) @ w + conv.bias


class WhisperEncoder(nn.Module):
    """conv1 -> gelu -> conv2(stride 2) -> gelu -> +pos -> 4 layers -> layer_norm. Input (B, 80, 2T)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_as_matmul = False  # set on the copy being exported (conv_as_matmul)
        self.conv1 = nn.Conv1d(80, D_MODEL, 3, padding=1)
        self.conv2 = nn.Conv1d(D_MODEL, D_MODEL, 3, stride=2, padding=1)
        self.embed_positions = nn.Parameter(torch.zeros(MAX_FRAMES, D_MODEL))
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(N_LAYERS))
        self.layer_norm = nn.LayerNorm(D_MODEL)

    def embed(self, mel: torch.Tensor) -> torch.Tensor:
        if self.stem_as_matmul:
            x = F.gelu(conv_as_matmul(self.conv1, mel)).transpose(1, 2)
            x = F.gelu(conv_as_matmul(self.conv2, x))
        else:
            x = F.gelu(self.conv1(mel))
            x = F.gelu(self.conv2(x)).transpose(1, 2)
        t = x.shape[1]
        return x + self.embed_positions[MAX_FRAMES - t :]

    def forward(self, mel: torch.Tensor, upto: int = N_LAYERS, final_norm: bool = True) -> torch.Tensor:
        x = self.embed(mel)
        for layer in self.layers[:upto]:
            x = layer(x)
        return self.layer_norm(x) if (final_norm and upto == N_LAYERS) else x


def _dequant(inits: dict[str, np.ndarray], q: str, s: str, z: str, axis: int) -> np.ndarray:
    qv = inits[q].astype(np.float32)
    sv, zv = inits[s].astype(np.float32), inits[z].astype(np.float32)
    if sv.ndim == 1 and sv.size > 1:
        shape = [1] * qv.ndim
        shape[axis] = -1
        sv, zv = sv.reshape(shape), zv.reshape(shape)
    return (qv - zv) * sv


def load_smart_turn_weights(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Dequantize smart-turn v3.2's encoder initializers into a WhisperEncoder state_dict."""
    model = onnx.load(str(path or smart_turn_onnx_path()))
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    deq: dict[str, np.ndarray] = {}
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            deq[n.output[0]] = _dequant(inits, n.input[0], n.input[1], n.input[2], axis)
    # named (non-anonymised) tensors: conv weights, biases, layer norms, positions
    sd: dict[str, np.ndarray] = {}
    for name, arr in inits.items():
        if name.startswith("inner.encoder.") and arr.dtype == np.float32:
            sd[name[len("inner.encoder."):]] = arr
    for out_name, arr in deq.items():
        src = producers[out_name].input[0]
        if src.startswith("inner.encoder.") and src.endswith("_quantized"):
            key = src[len("inner.encoder."):-len("_quantized")]
            sd[key] = arr
        elif out_name.startswith("inner.encoder.") and "bias" in out_name:
            sd[out_name[len("inner.encoder."):]] = arr

    def follow_to_bias(t: str) -> str | None:
        # MatMul -> QuantizeLinear -> DequantizeLinear -> Add(bias)
        for _ in range(4):
            nxt = consumers.get(t, [])
            if not nxt:
                return None
            n = nxt[0]
            if n.op_type == "Add":
                other = [i for i in n.input if i != t][0]
                return other if other.startswith("inner.encoder.") and other.endswith(".bias") else None
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                return None
            t = n.output[0]
        return None

    q_inputs: dict[str, str] = {}
    pending_k: list[tuple[str, np.ndarray]] = []
    for n in g.node:
        if n.op_type != "MatMul" or n.input[1] not in deq:
            continue
        w = deq[n.input[1]]  # (in, out) for x @ W
        bias = follow_to_bias(n.output[0])
        if bias is None:
            pending_k.append((n.input[0], w))
            continue
        key = bias[len("inner.encoder."):-len(".bias")]
        sd[key + ".weight"] = w.T
        if key.endswith("q_proj"):
            q_inputs[n.input[0]] = key
    for inp, w in pending_k:
        if inp in q_inputs:
            sd[q_inputs[inp].replace("q_proj", "k_proj") + ".weight"] = w.T
    out = {}
    for k, v in sd.items():
        if k.endswith("_scale") or k.endswith("_zero_point"):
            continue
        k = k.replace("self_attn.", "").replace("embed_positions.weight", "embed_positions")
        out[k] = torch.tensor(np.array(v, dtype=np.float32))
    return out


def pretrained_encoder() -> WhisperEncoder:
    enc = WhisperEncoder()
    sd = load_smart_turn_weights()
    missing, unexpected = enc.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"smart-turn weights do not fit the encoder: missing={missing} unexpected={unexpected}")
    return enc


def strip_activation_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove activation QuantizeLinear/DequantizeLinear pairs (weights stay dequantized): the same
    graph and weights computed in float, which is what the PyTorch rebuild should match exactly."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    rewire: dict[str, str] = {}
    q_out_to_in = {n.output[0]: n.input[0] for n in g.node if n.op_type == "QuantizeLinear"}
    drop = []
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in q_out_to_in and n.input[0] not in inits:
            rewire[n.output[0]] = q_out_to_in[n.input[0]]
            drop.append(n)
    drop += [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    keep = [n for n in g.node if n not in drop]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in rewire:
                n.input[i] = rewire[name]
    del g.node[:]
    g.node.extend(keep)
    return model


def onnx_encoder_output(mel: np.ndarray, path: str | Path | None = None, float_activations: bool = False) -> np.ndarray:
    """Run smart-turn's own graph up to the encoder's final layer norm (its intermediate output)."""
    import onnxruntime as ort

    model = onnx.load(str(path or smart_turn_onnx_path()))
    if float_activations:
        model = strip_activation_qdq(model)
    ln = next(n for n in model.graph.node if n.op_type == "LayerNormalization" and "inner.encoder.layer_norm.weight" in n.input)
    model.graph.output.append(onnx.helper.make_tensor_value_info(ln.output[0], onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([ln.output[0]], {"input_features": mel.astype(np.float32)})[0]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-9)))


def parity_report(mel: np.ndarray) -> dict[str, float]:
    """PyTorch encoder vs smart-turn's graph on the same log-mel (B, 80, 800): against the graph with
    float activations (checks the weight mapping; should be ~1) and against the shipped int8 graph."""
    enc = pretrained_encoder().eval()
    with torch.no_grad():
        out = enc(torch.from_numpy(mel)).numpy()
    ref_f = onnx_encoder_output(mel, float_activations=True)
    ref_q = onnx_encoder_output(mel)
    return {
        "cosine_vs_float_graph": _cos(ref_f, out),
        "max_abs_err_vs_float_graph": float(np.abs(ref_f - out).max()),
        "cosine_vs_int8_graph": _cos(ref_q, out),
        "cosine_int8_graph_vs_float_graph": _cos(ref_q, ref_f),
    }
