"""Which Keras layer's output a converted model's tensor holds, read from the names the converters give.

Both converters name tensors after the TensorFlow ops they came from (``model/block0_project_bn_1/batchnorm/add_1``),
so a name segment is a Keras layer name (:func:`segment_layer`). When a converter fuses
several layers into one op (Conv + batch norm + ReLU6), the tensor names all of them and holds the output of the
*last* in graph order; when a layer becomes several ops (a batch norm as Mul + Add), the last op holds its output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

WEIGHTED_KERAS = ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose", "Dense")


def segment_layer(name: str, layer_names: set[str]) -> str | None:
    """The Keras layer named by a ``/``-separated segment of a TensorFlow op name (TensorFlow's name scopes
    add ``_N`` suffixes: ``conv1_1`` is layer ``conv1``)."""
    for seg in name.split("/"):
        if seg in layer_names:
            return seg
        base = re.sub(r"_\d+$", "", seg)
        if base in layer_names:
            return base
    return None


def keras_output_layer(model: Any, name: str) -> str:
    """The Keras layer whose output a converter's fused op produces when the op is named after ``name``: a
    convolution or dense layer followed by a batch norm that is its only consumer is folded into it (TFLite and
    tf2onnx both fold it), so the tensor is the batch norm's output."""
    layer = model.get_layer(name)
    while type(layer).__name__ in WEIGHTED_KERAS or type(layer).__name__ == "BatchNormalization":
        nxt = _only_consumer(model, layer)
        if nxt is None or type(nxt).__name__ != "BatchNormalization":
            break
        layer = nxt
    return layer.name


def _only_consumer(model: Any, layer: Any) -> Any | None:
    consumers = [
        other
        for other in model.layers
        for node in getattr(other, "_inbound_nodes", [])
        for parent in node.parent_nodes
        if parent.operation is layer
    ]
    return consumers[0] if len(consumers) == 1 else None


# ops that only move data: their output is the same layer's output in another layout or shape
_ALIAS_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
_SKIPPED_OPS = {"Constant", "Shape", "ConstantOfShape", "QuantizeLinear", "DequantizeLinear", "Cast"}
_WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_TO_NCHW, _TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


@dataclass(frozen=True)
class KerasLayers:
    """The layers of a Keras model in graph order, with the inputs of each (what a layer's input is, for
    comparing a layer with its input) and the name of the model's input layer."""

    order: tuple[str, ...]
    inputs: dict[str, tuple[str, ...]]
    types: dict[str, str]
    input_layer: str | None
    output_layers: tuple[str, ...] = ()

    @classmethod
    def of(cls, model: Any) -> "KerasLayers":
        order, inputs, types = [], {}, {}
        for layer in model.layers:
            order.append(layer.name)
            types[layer.name] = type(layer).__name__
            nodes = getattr(layer, "_inbound_nodes", [])
            parents = nodes[0].parent_nodes if nodes else []
            inputs[layer.name] = tuple(p.operation.name for p in parents if p.operation.name != layer.name)
        first = model.layers[0] if model.layers else None
        input_layer = first.name if first is not None and type(first).__name__ == "InputLayer" else None
        outputs = []
        for t in model.outputs:
            history = getattr(t, "_keras_history", None)
            if history is not None:
                outputs.append(history[0].name)
        return cls(tuple(order), inputs, types, input_layer, tuple(outputs))

    def latest(self, candidates: Sequence[str]) -> str | None:
        """The layer latest in graph order among the layers named by ``candidates`` (op or tensor names)."""
        pos = {name: i for i, name in enumerate(self.order)}
        names = set(self.order)
        found = [layer for c in candidates if c and (layer := segment_layer(c, names))]
        return max(found, key=pos.__getitem__, default=None)


@dataclass(frozen=True)
class OnnxTensor:
    """The ONNX tensor holding a Keras layer's output; ``channels_first`` when it is NCHW where Keras has NHWC."""

    name: str
    channels_first: bool


def onnx_tensor_layers(onnx_model: Any, layers: KerasLayers) -> dict[str, OnnxTensor]:
    """Keras layer -> the ONNX tensor holding its output, for a tf2onnx export and the Q/DQ models made from it
    (which keep its tensor names; Q/DQ nodes themselves are skipped: a tensor is read after its Q/DQ by the tap).

    A node is named by its own name and output names, and a weighted node also by its weight and bias
    initializers (tf2onnx names a Conv with a folded batch norm ``Conv__N`` but its bias after the batch norm);
    the initializers other nodes read (shared Clip bounds) are not names of theirs. Layout-only ops (Transpose,
    Squeeze, ...) carry their input's layer.
    """
    inits = {i.name for i in onnx_model.graph.initializer}
    layer_of: dict[str, str] = {}  # tensor -> layer
    nchw: dict[str, bool] = {}
    out: dict[str, OnnxTensor] = {}
    producer = {o: n for n in onnx_model.graph.node for o in n.output}
    for i in onnx_model.graph.input:
        if i.name not in inits:
            nchw[i.name] = False
            if layers.input_layer:
                layer_of[i.name] = layers.input_layer
                out[layers.input_layer] = OnnxTensor(i.name, False)
    for node in onnx_model.graph.node:
        acts = [t for t in node.input if t and t not in inits]
        if node.op_type == "DequantizeLinear" and acts:  # a value read after Q/DQ is its tensor's value
            q = producer.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                src = q.input[0]
                for name in node.output:
                    layer_of[name] = layer_of.get(src, "")
                    nchw[name] = nchw.get(src, False)
            continue
        if node.op_type in _SKIPPED_OPS:
            continue
        layout = next((nchw[t] for t in acts if t in nchw), False)
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            layout = True if perm == _TO_NCHW else False if perm == _TO_NHWC else layout
        if node.op_type in _ALIAS_OPS:
            layer = layer_of.get(acts[0]) if acts else None
        else:
            names = [node.name, *node.output]
            if node.op_type in _WEIGHTED_OPS:  # weights and bias, also when read through a DequantizeLinear
                for t in node.input[1:]:
                    src = producer.get(t)
                    names.append(t if t in inits else src.input[0] if src and src.op_type == "DequantizeLinear" else "")
            layer = layers.latest(names)
        for name in node.output:
            nchw[name] = layout
            if layer:
                layer_of[name] = layer
        if layer and node.output:
            out[layer] = OnnxTensor(node.output[0], layout)
    return out


def tflite_tensor_layer(name: str, layers: KerasLayers) -> str | None:
    """The Keras layer whose output a TFLite tensor holds: its name joins the names of the TensorFlow ops fused
    into the op that wrote it with ``;``."""
    return layers.latest(name.split(";"))
