"""One Q/DQ graph in which each node's quantization is switched on or off at run time (sensitivity analysis).

:func:`quantship.calibrate.qdq.insert_qdq` writes a new model for every set of quantized nodes; a sensitivity
study needs a hundred such sets. Here every quantizable node (the same placement, the same ranges, the same
int8 weights) reads ``Where(gate, DequantizeLinear(QuantizeLinear(x)), x)`` for each activation input and
``Where(gate, DequantizeLinear(w_int8), w)`` for its weights, with its gate taken from one boolean graph
input. One session then runs any set: with a gate on, a node computes exactly what it computes in
``insert_qdq``'s model; with it off, exactly the float node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from quantship.calibrate.qdq import (
    FLOAT_OPS,
    INT8_MAX,
    POOLING_OPS,
    WEIGHTED_OPS,
    _weight_axis,
    activation_inputs,
    quantize_weight,
)
from quantship.lazy import lazy_import

GATES_INPUT = "qdq_gates"


@dataclass
class GatedQdq:
    """The gated model and the node behind each gate (``gates[i]`` switches ``nodes[i]``)."""

    model: Any
    nodes: list[str]

    def gates(self, quantized: Callable[[str], bool]) -> np.ndarray:
        """The gate vector that quantizes the nodes for which ``quantized(node name)`` is true."""
        return np.array([bool(quantized(n)) for n in self.nodes], dtype=bool)


def insert_gated_qdq(model: Any, amax: dict[str, float]) -> GatedQdq:
    """A copy of ``model`` with switchable Q/DQ on every node :func:`insert_qdq` would quantize.

    Args:
        model: Float ``onnx.ModelProto`` (opset >= 13).
        amax: Calibrated range per activation tensor (scale = amax / 127); inputs without one stay float.
    """
    onnx = lazy_import("onnx")
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    act_inputs = activation_inputs(model)
    new_nodes: list[Any] = []
    new_inits: list[Any] = []
    dq_of: dict[str, str] = {}
    gate_nodes: list[str] = []

    def act_dq(tensor: str) -> str | None:
        if tensor in dq_of:
            return dq_of[tensor]
        if tensor not in amax or amax[tensor] <= 0:
            return None
        scale, zp = f"{tensor}_scale", f"{tensor}_zero_point"
        new_inits.append(numpy_helper.from_array(np.array(amax[tensor] / INT8_MAX, np.float32), scale))
        new_inits.append(numpy_helper.from_array(np.array(0, np.int8), zp))
        q, dq = f"{tensor}_QuantizeLinear_Output", f"{tensor}_DequantizeLinear_Output"
        new_nodes.append(helper.make_node("QuantizeLinear", [tensor, scale, zp], [q], name=f"{tensor}_QuantizeLinear"))
        new_nodes.append(helper.make_node("DequantizeLinear", [q, scale, zp], [dq], name=f"{tensor}_DequantizeLinear"))
        dq_of[tensor] = dq
        return dq

    def weight_dq(node: Any, name: str) -> str:
        if name in dq_of:
            return dq_of[name]
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

    for k, node in enumerate(model.graph.node):
        node_copy = onnx.NodeProto()
        node_copy.CopyFrom(node)
        known = node.op_type in WEIGHTED_OPS or node.op_type in POOLING_OPS or node.op_type in ("Add", *FLOAT_OPS)
        if known and k in act_inputs:
            switched: list[tuple[int, str, str]] = []
            for i in act_inputs[k]:
                dq = act_dq(node.input[i])
                if dq is not None:
                    switched.append((i, dq, node.input[i]))
            if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in inits:
                switched.append((1, weight_dq(node, node.input[1]), node.input[1]))
            if switched:
                g = len(gate_nodes)
                gate_nodes.append(node.name)
                index, gate = f"{GATES_INPUT}_index_{g}", f"{GATES_INPUT}_{g}"
                new_inits.append(numpy_helper.from_array(np.array(g, np.int64), index))
                new_nodes.append(helper.make_node("Gather", [GATES_INPUT, index], [gate], name=f"{gate}_Gather"))
                for i, dq, original in switched:
                    chosen = f"{original}_gated_{g}"
                    new_nodes.append(helper.make_node("Where", [gate, dq, original], [chosen], name=f"{chosen}_Where"))
                    node_copy.input[i] = chosen
        new_nodes.append(node_copy)

    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    out.graph.initializer.extend(new_inits)
    out.graph.input.append(helper.make_tensor_value_info(GATES_INPUT, onnx.TensorProto.BOOL, [len(gate_nodes)]))
    return GatedQdq(out, gate_nodes)
