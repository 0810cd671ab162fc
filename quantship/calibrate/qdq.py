"""Insert QuantizeLinear/DequantizeLinear pairs for TensorRT's explicit quantization.

Placement follows TensorRT's rules for Q/DQ networks: symmetric int8 with zero point 0; weights per output
channel (int8 initializer + DequantizeLinear), activations per tensor (QuantizeLinear -> DequantizeLinear)
at the inputs of Conv / ConvTranspose / Gemm / MatMul, at the inputs of pooling, and at the residual (skip)
input of Add, also when a convolution produced it (NVIDIA's "quantize the residual input in skip
connections", so TensorRT fuses the branch's Conv + Add in int8; see :func:`residual_add_inputs`).
Outputs of weighted layers are left unquantized: TensorRT fuses them with what follows.

ONNX Runtime runs the result on the CPU (dequantize -> float op), which gives the int8 accuracy of the
TensorRT-bound model without a GPU. Ops the pass does not know are left in float and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from quantship.lazy import lazy_import

INT8_MAX = 127

# op -> (weight input index, how to find the output-channel axis)
WEIGHTED_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
POOLING_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
# Ops TensorRT fuses or runs in float around quantized layers: known, deliberately not given Q/DQ.
FLOAT_OPS = {
    "Relu",
    "Clip",
    "Sigmoid",
    "Tanh",
    "HardSigmoid",
    "HardSwish",
    "LeakyRelu",
    "PRelu",
    "Elu",
    "Selu",
    "Softplus",
    "Mul",
    "Sub",
    "Div",
    "Sum",
    "Max",
    "Min",
    "Pow",
    "Sqrt",
    "Exp",
    "Log",
    "Erf",
    "Neg",
    "Abs",
    "Reciprocal",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Concat",
    "Split",
    "Slice",
    "Gather",
    "Pad",
    "Identity",
    "Cast",
    "Shape",
    "Constant",
    "ConstantOfShape",
    "Expand",
    "Tile",
    "Resize",
    "Upsample",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceMax",
    "ReduceSum",
    "BatchNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "Dropout",
    "QuantizeLinear",
    "DequantizeLinear",
    "ArgMax",
    "TopK",
    "NonMaxSuppression",
}


@dataclass
class QdqReport:
    """What the pass did, node by node."""

    quantized: list[str] = field(default_factory=list)  # weighted/pooling/add nodes that got Q/DQ inputs
    excluded: list[str] = field(default_factory=list)  # left in float on request
    unknown_ops: list[tuple[str, str]] = field(default_factory=list)  # (op type, node) left in float
    missing_ranges: list[str] = field(default_factory=list)  # activations without a calibrated range
    float_weights: list[str] = field(default_factory=list)  # weights not stored as initializers

    def lines(self) -> list[str]:
        out = [f"{len(self.quantized)} nodes quantized, {len(self.excluded)} excluded on request"]
        if self.unknown_ops:
            ops = sorted({op for op, _ in self.unknown_ops})
            out.append(
                f"left in float, op unknown to the Q/DQ pass: {', '.join(ops)} ({len(self.unknown_ops)} nodes, "
                f"e.g. {self.unknown_ops[0][1]})"
            )
        if self.missing_ranges:
            out.append(
                f"{len(self.missing_ranges)} activation(s) without a calibrated range left in float, e.g. "
                f"{self.missing_ranges[0]}"
            )
        if self.float_weights:
            out.append(
                f"{len(self.float_weights)} weight(s) computed in the graph left in float, e.g. {self.float_weights[0]}"
            )
        return out


def _is_excluded(node: Any, exclude: set[str], node_layers: dict[str, str]) -> bool:
    return bool(exclude) and (node.name in exclude or node_layers.get(node.name) in exclude)


def _weight_axis(node: Any, weight: np.ndarray) -> int:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return weight.ndim - 1  # MatMul: (..., K, N)


def residual_add_inputs(
    node: Any, depth: dict[str, int], producers: dict[str, Any], consumers: dict[str, int]
) -> list[int]:
    """Which inputs of a two-activation Add get a Q/DQ (NVIDIA's residual rule).

    TensorRT fuses a weighted op with the Add that follows it (Conv + Add [+ ReLU] in one int8 kernel) when the
    Add's *other* input is int8. An input is fusable when it is produced by a weighted op whose only consumer is
    this Add; the fusable input on the longer path (the branch, not the shortcut) stays float and the other input
    (the skip connection) is quantized, whatever produced it, also another convolution. With no fusable input
    both inputs are quantized.
    """
    ins = list(node.input)
    fusable = [
        i
        for i in (0, 1)
        if ins[i] in producers and producers[ins[i]].op_type in WEIGHTED_OPS and consumers.get(ins[i], 0) == 1
    ]
    if not fusable:
        return [0, 1]
    branch = max(fusable, key=lambda i: (depth.get(ins[i], 0), i))
    return [i for i in (0, 1) if i != branch]


def activation_inputs(model: Any) -> dict[int, list[int]]:
    """For each node index, which of its inputs get an activation Q/DQ (TensorRT placement rules): the data
    inputs of weighted ops and pooling, and the inputs of Add chosen by :func:`residual_add_inputs`."""
    inits = {i.name for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, int] = {}
    depth: dict[str, int] = {}  # longest path from the graph inputs (ONNX nodes are topologically sorted)
    for node in model.graph.node:
        for i in node.input:
            consumers[i] = consumers.get(i, 0) + 1
        d = 1 + max((depth.get(i, 0) for i in node.input), default=0)
        for o in node.output:
            depth[o] = d
    out: dict[int, list[int]] = {}
    for k, node in enumerate(model.graph.node):
        ins = list(node.input)
        if node.op_type in WEIGHTED_OPS:
            out[k] = [i for i in ([0, 1] if node.op_type == "MatMul" else [0]) if i < len(ins) and ins[i] not in inits]
        elif node.op_type in POOLING_OPS:
            out[k] = [0]
        elif node.op_type == "Add" and len(ins) == 2 and not any(i in inits for i in ins):
            out[k] = residual_add_inputs(node, depth, producers, consumers)
    return out


def qdq_tensors(model: Any) -> list[str]:
    """Activation tensors that need a calibrated range for :func:`insert_qdq`."""
    seen: list[str] = []
    for k, idx in activation_inputs(model).items():
        for i in idx:
            name = model.graph.node[k].input[i]
            if name not in seen:
                seen.append(name)
    return seen


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8: scale_c = max|w_c| / 127 (1 for an all-zero channel)."""
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    amax = np.abs(moved).max(axis=1)
    scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def insert_qdq(
    model: Any,
    amax: dict[str, float],
    exclude: Iterable[str] = (),
    node_layers: dict[str, str] | None = None,
    include: Iterable[str] | None = None,
) -> tuple[Any, QdqReport]:
    """Return a copy of ``model`` with Q/DQ nodes, and a report.

    Args:
        model: Float ``onnx.ModelProto`` (opset >= 13).
        amax: Calibrated range per activation tensor (scale = amax / 127).
        exclude: Node names or Keras layer names to keep in float.
        node_layers: ONNX node name -> Keras layer name (see :func:`quantship.convert.onnx.onnx_node_layers`),
            to match ``exclude`` against Keras names.
        include: When given, only these nodes (node or Keras layer names) are quantized and every other
            quantizable node stays float: the one-layer-at-a-time mode of sensitivity analysis.
    """
    onnx = lazy_import("onnx")
    from onnx import helper, numpy_helper

    exclude, node_layers = set(exclude), dict(node_layers or {})
    include = set(include) if include is not None else None
    src = model
    inits = {i.name: i for i in src.graph.initializer}
    act_inputs = activation_inputs(src)
    report = QdqReport()
    new_nodes: list[Any] = []
    new_inits: list[Any] = []
    dq_of: dict[str, str] = {}  # tensor -> its dequantized name (activations and weights)

    def act_qdq(tensor: str) -> str | None:
        if tensor in dq_of:
            return dq_of[tensor]
        if tensor not in amax or amax[tensor] <= 0:
            if tensor not in report.missing_ranges:
                report.missing_ranges.append(tensor)
            return None
        scale, zp = f"{tensor}_scale", f"{tensor}_zero_point"
        new_inits.append(numpy_helper.from_array(np.array(amax[tensor] / INT8_MAX, np.float32), scale))
        new_inits.append(numpy_helper.from_array(np.array(0, np.int8), zp))
        q, dq = f"{tensor}_QuantizeLinear_Output", f"{tensor}_DequantizeLinear_Output"
        new_nodes.append(helper.make_node("QuantizeLinear", [tensor, scale, zp], [q], name=f"{tensor}_QuantizeLinear"))
        new_nodes.append(helper.make_node("DequantizeLinear", [q, scale, zp], [dq], name=f"{tensor}_DequantizeLinear"))
        dq_of[tensor] = dq
        return dq

    def weight_dq(node: Any, name: str) -> str | None:
        if name in dq_of:
            return dq_of[name]
        if name not in inits:
            report.float_weights.append(name)
            return None
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        axis = _weight_axis(node, w)
        q, scale = quantize_weight(w, axis)
        qn, sn, zn, dq = f"{name}_quantized", f"{name}_scale", f"{name}_zero_point", f"{name}_DequantizeLinear_Output"
        new_inits.extend(
            [
                numpy_helper.from_array(q, qn),
                numpy_helper.from_array(scale, sn),
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), zn),
            ]
        )
        new_nodes.append(
            helper.make_node("DequantizeLinear", [qn, sn, zn], [dq], name=f"{name}_DequantizeLinear", axis=axis)
        )
        dq_of[name] = dq
        return dq

    for k, node in enumerate(src.graph.node):
        node_copy = onnx.NodeProto()
        node_copy.CopyFrom(node)
        if (
            node.op_type not in WEIGHTED_OPS
            and node.op_type not in POOLING_OPS
            and node.op_type != "Add"
            and node.op_type not in FLOAT_OPS
        ):
            report.unknown_ops.append((node.op_type, node.name))
        elif k in act_inputs and (
            _is_excluded(node, exclude, node_layers)
            or (include is not None and not _is_excluded(node, include, node_layers))
        ):
            report.excluded.append(node.name)
        elif k in act_inputs:
            changed = False
            for i in act_inputs[k]:
                dq = act_qdq(node.input[i])
                if dq is not None:
                    node_copy.input[i] = dq
                    changed = True
            if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in inits:
                dq = weight_dq(node, node.input[1])
                if dq is not None:
                    node_copy.input[1] = dq
                    changed = True
            if changed:
                report.quantized.append(node.name)
        new_nodes.append(node_copy)

    out = onnx.ModelProto()
    out.CopyFrom(src)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    # Weights now stored as int8 are dropped in their float form when nothing else reads them.
    used = {i for n in new_nodes for i in n.input}
    kept = [i for i in src.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + new_inits)
    return out, report
