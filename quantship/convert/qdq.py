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

from quantship.calibrate.int8 import INT8_MAX, quantize_weight
from quantship.lazy import lazy_import

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


def with_nodes(model: Any, nodes: list[Any], new_inits: list[Any]) -> Any:
    """A copy of ``model`` whose graph runs ``nodes``: of its initializers only those a node still reads are kept
    (a weight now stored quantized is dropped in its float form), followed by ``new_inits``."""
    onnx = lazy_import("onnx")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + new_inits)
    return out


def _is_known(op_type: str) -> bool:
    """Whether the pass knows ``op_type``: it quantizes it or deliberately leaves it in float."""
    return op_type in WEIGHTED_OPS or op_type in POOLING_OPS or op_type == "Add" or op_type in FLOAT_OPS


def _kept_float(node: Any, exclude: set[str], include: set[str] | None, node_layers: dict[str, str]) -> bool:
    """Whether ``node`` stays float on request: excluded, or not among ``include`` when that is given."""
    return _is_excluded(node, exclude, node_layers) or (
        include is not None and not _is_excluded(node, include, node_layers)
    )


class _QdqWriter:
    """The Q/DQ nodes and initializers made so far, each tensor quantized once whatever reads it."""

    def __init__(self, amax: dict[str, float], inits: dict[str, Any], report: QdqReport):
        self.amax, self.inits, self.report = amax, inits, report
        self.nodes: list[Any] = []
        self.new_inits: list[Any] = []
        self._dq_of: dict[str, str] = {}  # tensor -> its dequantized name (activations and weights)

    def act_qdq(self, tensor: str) -> str | None:
        """The dequantized name of activation ``tensor`` after a Q/DQ pair at amax / 127; None (reported) without
        a calibrated range."""
        from onnx import helper, numpy_helper

        if tensor in self._dq_of:
            return self._dq_of[tensor]
        if tensor not in self.amax or self.amax[tensor] <= 0:
            if tensor not in self.report.missing_ranges:
                self.report.missing_ranges.append(tensor)
            return None
        scale, zp = f"{tensor}_scale", f"{tensor}_zero_point"
        self.new_inits.append(numpy_helper.from_array(np.array(self.amax[tensor] / INT8_MAX, np.float32), scale))
        self.new_inits.append(numpy_helper.from_array(np.array(0, np.int8), zp))
        q, dq = f"{tensor}_QuantizeLinear_Output", f"{tensor}_DequantizeLinear_Output"
        self.nodes.append(helper.make_node("QuantizeLinear", [tensor, scale, zp], [q], name=f"{tensor}_QuantizeLinear"))
        self.nodes.append(helper.make_node("DequantizeLinear", [q, scale, zp], [dq], name=f"{tensor}_DequantizeLinear"))
        self._dq_of[tensor] = dq
        return dq

    def weight_dq(self, node: Any, name: str) -> str | None:
        """The dequantized name of weight ``name`` stored as per-channel int8; None (reported) when it is not an
        initializer."""
        from onnx import helper, numpy_helper

        if name in self._dq_of:
            return self._dq_of[name]
        if name not in self.inits:
            self.report.float_weights.append(name)
            return None
        w = numpy_helper.to_array(self.inits[name]).astype(np.float32)
        axis = _weight_axis(node, w)
        q, scale = quantize_weight(w, axis)
        qn, sn, zn, dq = f"{name}_quantized", f"{name}_scale", f"{name}_zero_point", f"{name}_DequantizeLinear_Output"
        self.new_inits.extend(
            [
                numpy_helper.from_array(q, qn),
                numpy_helper.from_array(scale, sn),
                numpy_helper.from_array(np.zeros(scale.shape, np.int8), zn),
            ]
        )
        self.nodes.append(
            helper.make_node("DequantizeLinear", [qn, sn, zn], [dq], name=f"{name}_DequantizeLinear", axis=axis)
        )
        self._dq_of[name] = dq
        return dq

    def quantize_node(self, node: Any, node_copy: Any, inputs: list[int]) -> None:
        """Point ``node_copy`` at the Q/DQ of its activation ``inputs`` and of its weight; reported as quantized when
        any of them is."""
        changed = False
        for i in inputs:
            dq = self.act_qdq(node.input[i])
            if dq is not None:
                node_copy.input[i] = dq
                changed = True
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in self.inits:
            dq = self.weight_dq(node, node.input[1])
            if dq is not None:
                node_copy.input[1] = dq
                changed = True
        if changed:
            self.report.quantized.append(node.name)


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

    exclude, node_layers = set(exclude), dict(node_layers or {})
    include = set(include) if include is not None else None
    act_inputs = activation_inputs(model)
    report = QdqReport()
    writer = _QdqWriter(amax, {i.name: i for i in model.graph.initializer}, report)
    for k, node in enumerate(model.graph.node):
        node_copy = onnx.NodeProto()
        node_copy.CopyFrom(node)
        if not _is_known(node.op_type):
            report.unknown_ops.append((node.op_type, node.name))
        elif k in act_inputs and _kept_float(node, exclude, include, node_layers):
            report.excluded.append(node.name)
        elif k in act_inputs:
            writer.quantize_node(node, node_copy, act_inputs[k])
        writer.nodes.append(node_copy)
    return with_nodes(model, writer.nodes, writer.new_inits), report
