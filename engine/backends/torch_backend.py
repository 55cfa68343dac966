"""PyTorch backend: runs the exported ONNX graph with torch ops; on CUDA in FP16 with one CUDA graph per
input shape (batch x length bucket). For GPUs without TensorRT.

The graph is interpreted node by node (a small ONNX -> torch op table, no extra dependency). Shape
arithmetic (Shape, Gather/Concat/Slice of int64 shape tensors...) stays on the CPU, so for a fixed input
shape every device kernel is static and the whole forward can be captured once as a CUDA graph and then
replayed with no Python or launch overhead. On CPU the same interpreter runs in FP32, which is how its
parity with ONNX Runtime is tested (the CUDA paths were measured on an H200: docs/voice-and-runtime.md).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ops.logs import get_logger



def log() -> Any:
    """Resolved per use: a module-level bound logger would keep structlog's pre-configuration defaults."""
    return get_logger("engine.backends.torch")
Tensor = torch.Tensor
_MAX_GRAPHS = 64  # (batch, length) buckets kept captured: 8 lengths x batches 1..128 in powers of two


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ints(t: Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]  # shape tensors live on the CPU: no device sync


class _Transfers(threading.local):
    """Host->device copies of small CPU tensors (shape arithmetic, zero points) during CUDA graph work.

    A captured graph may only copy from pinned host memory, and it re-reads that same memory on every
    replay. So the eager warm-up before a capture records each copy's source in a pinned buffer, in
    order, and the capture copies from those buffers (checking they hold the same values: for a fixed
    input shape they do). The plan is kept alive with the captured graph."""

    plan: list[Tensor] | None = None
    replaying = False
    at = 0
    pin: Callable[[Tensor], Tensor] = staticmethod(lambda t: t.pin_memory())  # tests swap in a clone

    def source(self, t: Tensor) -> Tensor:
        if self.plan is None:
            return t
        if not self.replaying:
            self.plan.append(self.pin(t))
            return self.plan[-1]
        if self.at >= len(self.plan) or self.plan[self.at].shape != t.shape or not torch.equal(self.plan[self.at], t):
            raise RuntimeError("host->device copies differ between warm-up and capture")
        self.at += 1
        return self.plan[self.at - 1]


_XFER = _Transfers()


def _move(t: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    if t.device.type == "cpu" and device.type != "cpu":
        t = _XFER.source(t).to(device, non_blocking=True)
    return t.to(device, dtype) if dtype is not None else t.to(device)


def _same_device(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if a.device != b.device:  # a CPU shape/scalar constant meeting a device tensor
        if a.device.type == "cpu":
            a = _move(a, b.device)
        else:
            b = _move(b, a.device)
    if a.is_floating_point() and b.is_floating_point() and a.dtype != b.dtype:
        b = b.to(a.dtype)
    return a, b


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., list[Tensor]]:
    return lambda x, a: [fn(*_same_device(x[0], x[1]))]


def _qrange(zp: Tensor) -> tuple[int, int]:
    return (0, 255) if zp.dtype == torch.uint8 else (-128, 127)


def _axis_shape(scale: Tensor, x: Tensor, axis: int) -> Tensor:
    if scale.numel() == 1:
        return scale.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def _quantize(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    # Kept as float ("fake quant"): the rounding is reproduced, the integer storage is not needed.
    zp = x[2] if len(x) > 2 and x[2] is not None else torch.zeros((), dtype=torch.uint8)
    lo, hi = _qrange(zp)
    axis = a.get("axis", 1) % max(1, x[0].dim())
    s = _move(_axis_shape(x[1], x[0], axis), x[0].device, x[0].dtype)
    z = _move(_axis_shape(zp, x[0], axis), x[0].device, x[0].dtype)
    q = torch.clamp(torch.round(x[0] / s) + z, lo, hi)
    return [q]


def _dequantize(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    dtype = x[1].dtype if x[1].is_floating_point() else torch.float32
    v = _move(x[0], x[1].device, dtype) if not x[0].is_floating_point() else x[0].to(dtype)
    zp = x[2] if len(x) > 2 and x[2] is not None else torch.zeros((), dtype=dtype)
    axis = a.get("axis", 1) % max(1, v.dim())
    s = _move(_axis_shape(x[1], v, axis), v.device, dtype)
    z = _move(_axis_shape(zp, v, axis), v.device, dtype)
    return [(v - z) * s]


def _dynamic_quantize(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    # ONNX DynamicQuantizeLinear: uint8, scale from the range (which always includes 0). ONNX takes the
    # range over the whole tensor, so a clip's result would depend on the clips batched with it. Our
    # graphs quantise only (batch, time, channels) activations (checked at load), so the range is taken
    # per batch row instead: each clip gets exactly the scale ONNX Runtime gives it when run alone, and a
    # GPU batch of any size returns what the CPU returns one clip at a time. The [B,1,1] scale and zero
    # point broadcast through the MatMulInteger and Mul that consume them.
    v = x[0].float()
    if v.dim() >= 3:
        dims = tuple(range(1, v.dim()))
        lo = torch.clamp(torch.amin(v, dim=dims, keepdim=True), max=0.0)
        hi = torch.clamp(torch.amax(v, dim=dims, keepdim=True), min=0.0)
    else:
        lo, hi = torch.clamp(v.min(), max=0.0), torch.clamp(v.max(), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    q = torch.clamp(torch.round(v / scale) + zp, 0, 255)
    return [q, scale, zp]  # kept as float tensors: exact small integers


def _matmul_integer(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    # Integer products summed over up to a few thousand terms: exact in float64 (CPU); on GPU float32
    # (relative error ~1e-7, far below the int8 quantisation step).
    acc = torch.float64 if x[0].device.type == "cpu" else torch.float32
    A = x[0].to(acc) - (_move(x[2], x[0].device, acc) if len(x) > 2 and x[2] is not None else 0)
    B = _move(x[1], x[0].device, acc) - (_move(x[3], x[0].device, acc) if len(x) > 3 and x[3] is not None else 0)
    return [torch.matmul(A, B)]  # int32 in ONNX; a following Cast/Mul turns it to float anyway


def _layernorm(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    axis = a.get("axis", -1) % x[0].dim()
    shape = x[0].shape[axis:]
    y = torch.nn.functional.layer_norm(x[0].float(), shape, x[1].float() if x[1] is not None else None,
                                       x[2].float() if len(x) > 2 and x[2] is not None else None,
                                       a.get("epsilon", 1e-5))
    return [y.to(x[0].dtype)]  # computed in FP32: FP16 variance overflows/underflows


def _softmax(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    return [torch.softmax(x[0].float(), dim=a.get("axis", -1)).to(x[0].dtype)]


def _log_softmax(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    return [torch.log_softmax(x[0].float(), dim=a.get("axis", -1)).to(x[0].dtype)]


def _gemm(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    A = x[0].t() if a.get("transA", 0) else x[0]
    B = x[1].t() if a.get("transB", 0) else x[1]
    y = a.get("alpha", 1.0) * (A @ B.to(A.dtype))
    if len(x) > 2 and x[2] is not None:
        y = y + a.get("beta", 1.0) * x[2].to(y.dtype)
    return [y]


def _conv(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    nd = x[1].dim() - 2
    pads = a.get("pads", [0] * (2 * nd))
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise NotImplementedError("Conv auto_pad")
    if any(pads[i] != pads[i + nd] for i in range(nd)):
        raise NotImplementedError("asymmetric Conv pads")
    fn = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d}[nd]
    w = x[1].to(x[0].dtype)
    b = x[2].to(x[0].dtype) if len(x) > 2 and x[2] is not None else None
    return [fn(x[0], w, b, stride=a.get("strides", [1] * nd), padding=pads[:nd], dilation=a.get("dilations", [1] * nd),
               groups=a.get("group", 1))]


def _reshape(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    shape = _ints(x[1])
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x[0].reshape(shape)]


def _slice(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    out = x[0]
    for s, e, ax, st in zip(starts, ends, axes, steps):
        n = out.shape[ax]
        idx: list[Any] = [slice(None)] * out.dim()
        if st > 0:
            s = max(0, min(n, s + n if s < 0 else s))
            e = max(0, min(n, e + n if e < 0 else e))
            idx[ax] = slice(s, e, st)
            out = out[tuple(idx)]
        else:  # torch slices only forwards (a reversed pads list in an exported Pad's shape arithmetic)
            s = max(0, min(n - 1, s + n if s < 0 else s))
            e = max(-1, min(n - 1, e + n if e < 0 else e))
            out = out.index_select(ax, torch.tensor(list(range(s, e, st)), dtype=torch.long, device=out.device))
    return [out]


def _gather(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    axis = a.get("axis", 0) % x[0].dim()
    idx = _move(x[1], x[0].device).long()
    idx = torch.where(idx < 0, idx + x[0].shape[axis], idx)
    return [torch.index_select(x[0], axis, idx.reshape(-1)).reshape(
        x[0].shape[:axis] + idx.shape + x[0].shape[axis + 1:])]


def _unsqueeze(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    axes = _ints(x[1]) if len(x) > 1 else list(a["axes"])
    y = x[0]
    rank = y.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        y = y.unsqueeze(ax)
    return [y]


def _squeeze(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else a.get("axes")
    if axes is None:
        return [x[0].squeeze()]
    y = x[0]
    for ax in sorted((ax % y.dim() for ax in axes), reverse=True):
        y = y.squeeze(ax)
    return [y]


def _concat(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    dev = next((t.device for t in x if t.device.type != "cpu"), x[0].device)
    return [torch.cat([_move(t, dev) for t in x], dim=a["axis"])]


def _reduce(fn: Callable[..., Tensor]) -> Callable[..., list[Tensor]]:
    def run(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
        axes = _ints(x[1]) if len(x) > 1 and x[1] is not None else a.get("axes")
        keep = bool(a.get("keepdims", 1))
        if not axes:
            return [fn(x[0].float(), dim=tuple(range(x[0].dim())), keepdim=keep).to(x[0].dtype)]
        return [fn(x[0].float(), dim=tuple(axes), keepdim=keep).to(x[0].dtype)]

    return run


_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 6: torch.int32, 7: torch.int64, 9: torch.bool,
           10: torch.float16, 11: torch.float64}


def _cast(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    return [x[0].to(_DTYPES[a["to"]])]


def _const(node_attrs: dict[str, Any]) -> Tensor:
    if "value" in node_attrs:
        return torch.from_numpy(numpy_helper.to_array(node_attrs["value"]).copy())
    for k, dt in (("value_float", torch.float32), ("value_int", torch.int64)):
        if k in node_attrs:
            return torch.tensor(node_attrs[k], dtype=dt)
    if "value_ints" in node_attrs:
        return torch.tensor(list(node_attrs["value_ints"]), dtype=torch.int64)
    raise NotImplementedError(f"Constant with {list(node_attrs)}")


def _expand(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    shape = _ints(x[1])
    out = torch.broadcast_shapes(tuple(x[0].shape), tuple(shape))
    return [x[0].expand(out)]


def _const_of_shape(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    v = torch.from_numpy(numpy_helper.to_array(a["value"]).copy()) if "value" in a else torch.zeros(1)
    return [torch.full(_ints(x[0]), v.reshape(-1)[0].item(), dtype=v.dtype)]


def _pad(x: list[Tensor], a: dict[str, Any]) -> list[Tensor]:
    """ONNX Pad (opset 11+): pads are [begin of each axis..., end of each axis...]; torch wants the last
    axis first, (begin, end) pairs."""
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":  # the export pads with zeros only (the conv stem as MatMuls)
        raise NotImplementedError(f"Pad mode {mode}")
    pads = _ints(x[1])
    rank = x[0].dim()
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(rank))
    axes = [ax + rank if ax < 0 else ax for ax in axes]
    begin, end = dict(zip(axes, pads[: len(axes)])), dict(zip(axes, pads[len(axes) :]))
    if any(p < 0 for p in pads):
        raise NotImplementedError("negative Pad (cropping)")
    flat: list[int] = []
    for ax in range(rank - 1, -1, -1):
        flat += [begin.get(ax, 0), end.get(ax, 0)]
    value = x[2].reshape(-1)[0].item() if len(x) > 2 and x[2] is not None and x[2].numel() else 0.0
    return [torch.nn.functional.pad(x[0], flat, mode="constant", value=value)]


def _split(x: list[Tensor], a: dict[str, Any], n_out: int) -> list[Tensor]:
    axis = a.get("axis", 0)
    sizes = _ints(x[1]) if len(x) > 1 and x[1] is not None else a.get("split")
    if sizes is None:
        return list(torch.tensor_split(x[0], n_out, dim=axis))
    return list(torch.split(x[0], list(sizes), dim=axis))


def _einsum_args(x: list[Tensor]) -> list[Tensor]:
    dev = next((t.device for t in x if t.device.type != "cpu"), x[0].device)
    dt = next((t.dtype for t in x if t.is_floating_point()), x[0].dtype)
    return [_move(t, dev, dt) for t in x]


OPS: dict[str, Callable[..., list[Tensor]]] = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul),
    "Div": _binary(lambda p, q: torch.div(p, q, rounding_mode="trunc") if not p.is_floating_point() else p / q),
    "Pow": _binary(torch.pow), "MatMul": _binary(torch.matmul), "Equal": _binary(torch.eq), "Less": _binary(torch.lt),
    "Greater": _binary(torch.gt), "Max": _binary(torch.maximum), "Min": _binary(torch.minimum),
    "Sqrt": lambda x, a: [torch.sqrt(x[0])], "Erf": lambda x, a: [torch.erf(x[0])], "Exp": lambda x, a: [torch.exp(x[0])],
    "Log": lambda x, a: [torch.log(x[0])], "Neg": lambda x, a: [-x[0]], "Abs": lambda x, a: [x[0].abs()],
    "Tanh": lambda x, a: [torch.tanh(x[0])], "Sigmoid": lambda x, a: [torch.sigmoid(x[0])],
    "Relu": lambda x, a: [torch.relu(x[0])], "Reciprocal": lambda x, a: [1.0 / x[0]], "Not": lambda x, a: [~x[0]],
    "Identity": lambda x, a: [x[0]], "Dropout": lambda x, a: [x[0]],
    "Gelu": lambda x, a: [torch.nn.functional.gelu(x[0], approximate="tanh" if a.get("approximate") in (b"tanh", "tanh") else "none")],
    "Where": lambda x, a: [torch.where(_move(x[0], x[1].device), *_same_device(x[1], x[2]))],
    "Transpose": lambda x, a: [x[0].permute(*(a.get("perm") or list(range(x[0].dim()))[::-1]))],
    "Shape": lambda x, a: [torch.tensor(list(x[0].shape)[a.get("start", 0):a.get("end")], dtype=torch.int64)],
    "Softmax": _softmax, "LogSoftmax": _log_softmax, "LayerNormalization": _layernorm, "Gemm": _gemm,
    "Conv": _conv, "Reshape": _reshape, "Slice": _slice, "Gather": _gather, "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze, "Concat": _concat, "Cast": _cast, "Expand": _expand, "ConstantOfShape": _const_of_shape,
    "Pad": _pad,
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(lambda t, dim, keepdim: torch.amax(t, dim=dim, keepdim=keepdim)),
    "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize,
    "DynamicQuantizeLinear": _dynamic_quantize, "MatMulInteger": _matmul_integer,
    "Einsum": lambda x, a: [torch.einsum(a["equation"].decode() if isinstance(a["equation"], bytes) else a["equation"],
                                         *_einsum_args(x))],
    "Range": lambda x, a: [torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype)],
    "Flatten": lambda x, a: [x[0].reshape(int(np.prod(x[0].shape[:a.get("axis", 1)])), -1)],
    "ArgMax": lambda x, a: [torch.argmax(x[0], dim=a.get("axis", 0), keepdim=bool(a.get("keepdims", 1)))],
    "Clip": lambda x, a: [torch.clamp(x[0], min=x[1].item() if len(x) > 1 and x[1] is not None else None,
                                      max=x[2].item() if len(x) > 2 and x[2] is not None else None)],
}


def _check_row_quantization(graph: onnx.GraphProto) -> None:
    """Per-row dynamic quantisation (see _dynamic_quantize) is only equivalent when each scale and zero
    point feeds a MatMulInteger or the Mul that rescales its product, which is how onnxruntime's
    quantize_dynamic writes it; anything else is refused (attach_backend then stays on ONNX Runtime)."""
    produced = {o: n.op_type for n in graph.node for o in n.output[1:] if n.op_type == "DynamicQuantizeLinear"}
    for n in graph.node:
        for i in n.input:
            if i in produced and n.op_type not in ("MatMulInteger", "Mul"):
                raise NotImplementedError(f"DynamicQuantizeLinear output {i!r} feeds {n.op_type}")


class OnnxTorchGraph:
    """An ONNX graph executed with torch ops on `device`; float initialisers in `dtype`."""

    def __init__(self, onnx_path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        model = onnx.load(onnx_path)
        graph = model.graph
        unsupported = sorted({n.op_type for n in graph.node if n.op_type not in OPS and n.op_type not in ("Constant", "Split")}
                             | {f"{n.domain}:{n.op_type}" for n in graph.node if n.domain not in ("", "ai.onnx")})
        if unsupported:
            raise NotImplementedError(f"ops not supported by the torch backend: {unsupported}")
        _check_row_quantization(graph)
        self.device = torch.device(device)
        self.dtype = dtype
        self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n)) for n in graph.node]
        init = {i.name for i in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in init]
        self.output_names = [o.name for o in graph.output]
        self.inputs_meta, self.outputs_meta = list(graph.input), list(graph.output)
        self.consts: dict[str, Tensor] = {}
        for t in graph.initializer:
            self.consts[t.name] = self._place(torch.from_numpy(numpy_helper.to_array(t).copy()))
        for op, _ins, outs, a in self.nodes:
            if op == "Constant":
                self.consts[outs[0]] = self._place(_const(a))

    def _place(self, t: Tensor) -> Tensor:
        # Integer tensors with few elements are shape arithmetic: keep them on the CPU (no device syncs,
        # static values inside CUDA graphs). Quantised weights (int8/uint8, large) go to the device.
        if t.is_floating_point():
            return t.to(self.device, self.dtype if t.dtype in (torch.float32, torch.float16) else t.dtype)
        return t if t.numel() <= 64 else t.to(self.device)

    @torch.inference_mode()
    def forward(self, feeds: dict[str, Tensor]) -> list[Tensor]:
        env: dict[str, Tensor | None] = dict(self.consts)
        env[""] = None
        env.update(feeds)
        for op, ins, outs, a in self.nodes:
            if op == "Constant":
                continue
            args = [env[i] for i in ins]
            res = _split(args, a, len(outs)) if op == "Split" else OPS[op](args, a)
            for name, val in zip(outs, res):
                env[name] = val
        return [env[o] for o in self.output_names]  # type: ignore[misc]


class _Meta:
    def __init__(self, name: str) -> None:
        self.name = name


class TorchSession:
    """onnxruntime-compatible session over OnnxTorchGraph; CUDA graphs per input shape on GPU."""

    def __init__(self, onnx_path: str, device: str = "cpu", fp16: bool | None = None, cuda_graphs: bool | None = None,
                 pad_batches: bool | None = None, device_features: bool | None = None) -> None:
        on_gpu = device.startswith("cuda")
        self.fp16 = on_gpu if fp16 is None else fp16
        self.graph = OnnxTorchGraph(onnx_path, device, torch.float16 if self.fp16 else torch.float32)
        self.use_graphs = on_gpu if cuda_graphs is None else cuda_graphs
        # The scheduler sends batches of any size 1..max_batch; rounding the batch up to a power of two
        # keeps the captured shapes to a handful per length bucket instead of one capture per size.
        # Rows are independent (per-row quantisation), so the zero rows added change nothing.
        self.pad_batches = self.use_graphs if pad_batches is None else pad_batches
        # The log-mel front end on the model's device (UnderstandingModel uses it when offered): on a GPU
        # numpy features would otherwise cost ~10x the model per clip.
        from engine.backends.torch_features import TorchLogMel

        self.log_mel_batch = TorchLogMel(self.graph.device) if (on_gpu if device_features is None else device_features) else None
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._graphs: OrderedDict[tuple, tuple[Any, dict[str, Tensor], list[Tensor], list[Tensor]]] = OrderedDict()
        self._lock = threading.Lock()  # captured graphs own static buffers: one replay at a time

    def get_inputs(self) -> list[_Meta]:
        return [_Meta(n) for n in self.graph.input_names]

    def get_outputs(self) -> list[_Meta]:
        return [_Meta(n) for n in self.graph.output_names]

    def _tensors(self, feeds: dict[str, np.ndarray | Tensor]) -> dict[str, Tensor]:
        out = {}
        for k, v in feeds.items():
            t = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
            out[k] = t.to(self.graph.device, self.graph.dtype) if t.is_floating_point() else (
                t if t.numel() <= 64 else t.to(self.graph.device))
        return out

    def _captured(self, feeds: dict[str, Tensor]) -> tuple[Any, dict[str, Tensor], list[Tensor], list[Tensor]]:
        key = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(feeds.items()))
        hit = self._graphs.get(key)
        if hit is not None:
            self._graphs.move_to_end(key)
            return hit
        static = {k: v.clone() for k, v in feeds.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        plan: list[Tensor] = []
        try:
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up (allocator, cuBLAS handles) outside the capture
                    plan.clear()
                    _XFER.plan, _XFER.replaying = plan, False
                    self.graph.forward(static)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            _XFER.replaying, _XFER.at = True, 0
            with torch.cuda.graph(g, pool=self._pool):  # replays are serial (lock) and copy out at once
                outs = self.graph.forward(static)
        finally:
            _XFER.plan, _XFER.replaying = None, False
        self._graphs[key] = (g, static, outs, plan)
        while len(self._graphs) > _MAX_GRAPHS:
            self._graphs.popitem(last=False)
        log().info("captured CUDA graph", shapes=str(key), graphs=len(self._graphs))
        return self._graphs[key]

    @staticmethod
    def _padded(feeds: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        def batched(v: Any) -> bool:  # float feeds (numpy, or torch from the device front end)
            return v.ndim >= 1 and (v.is_floating_point() if isinstance(v, torch.Tensor) else v.dtype.kind == "f")

        def pad(v: Any, rows: int) -> Any:
            if isinstance(v, torch.Tensor):
                return torch.cat([v, v.new_zeros((rows, *v.shape[1:]))])
            return np.concatenate([v, np.zeros((rows, *v.shape[1:]), v.dtype)])

        sizes = {v.shape[0] for v in feeds.values() if batched(v)}
        if len(sizes) != 1:
            return feeds, None
        n = sizes.pop()
        target = 1 << max(0, n - 1).bit_length()
        if target == n:
            return feeds, n
        return {k: pad(v, target - n) if batched(v) else v for k, v in feeds.items()}, n

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, Any]) -> list[np.ndarray]:
        rows = None
        if self.pad_batches:
            feeds, rows = self._padded(feeds)
        tensors = self._tensors(feeds)
        with self._lock:
            outs = None
            if self.use_graphs:
                try:
                    g, static, outs, _plan = self._captured(tensors)
                    for k, v in tensors.items():
                        static[k].copy_(v)
                    g.replay()
                except RuntimeError as exc:  # e.g. a data-dependent shape: not capturable, run eagerly
                    log().warning("CUDA graph capture failed; running eagerly", error=repr(exc))
                    self.use_graphs, self._graphs, outs = False, OrderedDict(), None
            if outs is None:
                outs = self.graph.forward(tensors)
            res = {n: (o.float() if o.is_floating_point() else o)[: rows if o.dim() else None].cpu().numpy()
                   for n, o in zip(self.graph.output_names, outs)}
        return [res[n] for n in (output_names or self.graph.output_names)]


class TorchCudaBackend:
    """Raises RuntimeError when CUDA is not available (select_backend then falls back to ONNX CPU)."""

    name = "torch"

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda is not available")
        self.device = "cuda"

    def session(self, onnx_path: str, threads: int = 1) -> TorchSession:
        return TorchSession(onnx_path, self.device)


__all__ = ["OnnxTorchGraph", "TorchSession", "TorchCudaBackend", "OPS"]
