"""The shipped int8 graph as a float graph, for runtimes without ONNX Runtime's integer ops (TensorRT).

`quantize_dynamic` writes each weight MatMul as a chain:

    DynamicQuantizeLinear(x) -> (xq, x_scale, x_zp)
    MatMulInteger(xq, Wq, x_zp, W_zp) -> Cast(float) -> Mul(., x_scale * W_scale) -> y

TensorRT's ONNX parser takes neither integer op (it quantizes through Q/DQ pairs, or runs float weights in
FP16). `float_graph` rewrites every such chain back into `MatMul(x, (Wq - W_zp) * W_scale) -> y`: the float
model the int8 graph was quantized from, up to the weights' 8-bit rounding. Everything else (shapes, heads,
the temperature and blank penalty folded into the graph) is left as it is. Needs only onnx and numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

INTEGER_OPS = ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv")


class FloatGraphError(ValueError):
    pass


def _only(consumers: dict[str, list[onnx.NodeProto]], name: str, op: str, where: str) -> onnx.NodeProto:
    users = consumers.get(name, [])
    if len(users) != 1 or users[0].op_type != op:
        raise FloatGraphError(f"{where}: expected one {op} after it, found {[u.op_type for u in users]}")
    return users[0]


def float_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of model with every dynamic-int8 weight MatMul turned back into a float MatMul."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    replace: dict[int, onnx.NodeProto] = {}  # id(node) -> the float MatMul taking its place
    drop: set[int] = set()
    new_inits: list[onnx.TensorProto] = []
    for n in g.node:
        if n.op_type != "MatMulInteger":
            continue
        where = f"MatMulInteger {n.name!r}"
        if len(n.input) < 2 or n.input[1] not in inits:
            raise FloatGraphError(f"{where}: its weight is not an initializer")
        dql = producer.get(n.input[0])
        if dql is None or dql.op_type != "DynamicQuantizeLinear":
            raise FloatGraphError(f"{where}: its input does not come from DynamicQuantizeLinear")
        cast = _only(consumers, n.output[0], "Cast", where)
        mul = _only(consumers, cast.output[0], "Mul", where)
        scale = next((i for i in mul.input if i != cast.output[0]), None)
        scale_mul = producer.get(scale or "")
        if scale_mul is None or scale_mul.op_type != "Mul" or dql.output[1] not in scale_mul.input:
            raise FloatGraphError(f"{where}: its output scale is not x_scale * W_scale")
        w_scale_name = next(i for i in scale_mul.input if i != dql.output[1])
        if w_scale_name not in inits:
            raise FloatGraphError(f"{where}: W_scale is not an initializer")
        wq = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        w_zp = numpy_helper.to_array(inits[n.input[3]]).astype(np.float32) if len(n.input) > 3 and n.input[3] else 0.0
        w = (wq - w_zp) * numpy_helper.to_array(inits[w_scale_name]).astype(np.float32)  # per output column
        w_name = f"{n.input[1]}_dequantized"
        new_inits.append(numpy_helper.from_array(w, w_name))
        replace[id(mul)] = helper.make_node("MatMul", [dql.input[0], w_name], [mul.output[0]], name=f"{n.name}_float")
        drop.update({id(n), id(cast)})
        if all(id(u) in drop or u is mul for u in consumers.get(scale or "", [])):
            drop.add(id(scale_mul))

    nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
    nodes = _live(nodes, {o.name for o in g.output})
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [i for i in g.initializer if i.name in used] + [i for i in new_inits if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    left = sorted({n.op_type for n in nodes if n.op_type in INTEGER_OPS})
    if left:
        raise FloatGraphError(f"integer ops left after the rewrite: {left}")
    return out


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Drop nodes none of whose outputs is used (the DynamicQuantizeLinear nodes the rewrite orphaned)."""
    while True:
        used = outputs | {i for n in nodes for i in n.input}
        keep = [n for n in nodes if any(o in used for o in n.output)]
        if len(keep) == len(nodes):
            return keep
        nodes = keep


def float_graph_bytes(onnx_path: str | Path) -> bytes:
    """The float graph of the model file at onnx_path, serialized (what TensorRT's parser reads)."""
    return float_graph(onnx.load(str(onnx_path))).SerializeToString()
