"""Keras -> ONNX with tf2onnx (opset 17 by default), fixed or dynamic batch, checked with onnx.checker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantship.convert.artifact import write_onnx_artifact
from quantship.convert.layer_names import WEIGHTED_KERAS, keras_output_layer, segment_layer
from quantship.errors import ConfigError, ConversionError
from quantship.fileio import sha256_json
from quantship.lazy import lazy_import
from quantship.logs import redirect_native_output
from quantship.manifest import Artifact, load_reusable

INPUT_NAME = "input"
OUTPUT_NAME = "output"


@dataclass(frozen=True)
class OnnxSpec:
    """Attributes:
    opset: ONNX opset (tf2onnx 1.17 supports up to 18; per-channel Q/DQ needs at least 13).
    batch: Fixed batch size, or None for a dynamic batch dimension.
    """

    opset: int = 17
    batch: int | None = None

    def __post_init__(self) -> None:
        if not 13 <= self.opset <= 18:
            raise ConfigError(f"ONNX opset must be between 13 and 18 for this exporter, got {self.opset}")
        if self.batch is not None and self.batch <= 0:
            raise ConfigError(f"fixed batch must be positive, got {self.batch}")


def keras_to_onnx(model: Any, spec: OnnxSpec = OnnxSpec(), log_path: str | Path | None = None):
    """Export a single-input, single-output Keras model to an ``onnx.ModelProto``.

    The input keeps the Keras layout (NHWC) and is named ``input``; the output is named ``output``.

    Raises:
        ConversionError: tf2onnx failed, or the result does not pass ``onnx.checker``.
    """
    tf = lazy_import("tensorflow", purpose="ONNX export")
    tf2onnx = lazy_import("tf2onnx", purpose="ONNX export")
    onnx = lazy_import("onnx")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConversionError("ONNX export supports single-input, single-output models")
    shape = (spec.batch, *model.inputs[0].shape[1:])
    signature = [tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)]
    fn = tf.function(lambda x: model(x, training=False), input_signature=signature)
    try:
        with redirect_native_output(log_path):
            proto, _ = tf2onnx.convert.from_function(fn, input_signature=signature, opset=spec.opset)
    except Exception as exc:  # noqa: BLE001 - tf2onnx raises many types
        where = f"; log: {log_path}" if log_path else ""
        raise ConversionError(
            "tf2onnx export failed: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}{where}"
        ) from None
    _rename_output(proto, OUTPUT_NAME)
    proto.doc_string = "exported by quantship with tf2onnx"
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001
        raise ConversionError(f"exported ONNX model fails onnx.checker: {exc}") from None
    return proto


def _rename_output(proto: Any, new: str) -> None:
    old = proto.graph.output[0].name
    if old == new:
        return
    for node in proto.graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    proto.graph.output[0].name = new


PASS_THROUGH_KERAS = ("ZeroPadding2D", "Dropout", "Reshape", "Flatten")


def onnx_node_layers(onnx_model: Any, keras_model: Any) -> dict[str, str]:
    """Map each weighted ONNX node (Conv, Gemm, MatMul) of a tf2onnx export to the Keras layer it came from.

    tf2onnx names a convolution after the last TensorFlow op it absorbed (a folded batch norm, a bias add) or
    after nothing at all (``Conv__21``). The layer is found from the node's name, its weight/bias inputs and
    its consumers, and a match on a batch-norm or activation layer is followed upstream to the weighted layer
    that feeds it.
    """
    layers = {layer.name: layer for layer in keras_model.layers}
    names = set(layers)
    consumers: dict[str, list[str]] = {}
    for node in onnx_model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node.name)

    def upstream_weighted(layer_name: str) -> str | None:
        layer = layers[layer_name]
        for _ in range(4):
            if type(layer).__name__ in WEIGHTED_KERAS:
                return layer.name
            inbound = getattr(layer, "_inbound_nodes", [])
            parents = inbound[0].parent_nodes if inbound else []
            if len(parents) != 1:
                return None
            layer = parents[0].operation
        return None

    out = {}
    for node in onnx_model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        candidates = [node.name, *node.input[1:], *(c for o in node.output for c in consumers.get(o, []))]
        for cand in candidates:
            layer = segment_layer(cand, names)
            if layer and (weighted := upstream_weighted(layer)):
                out[node.name] = weighted
                break
    return out


def onnx_layer_outputs(onnx_model: Any, keras_model: Any, node_layers: dict[str, str] | None = None) -> dict[str, str]:
    """Keras layer name -> the ONNX tensor that holds that layer's output (with batch norms folded into the
    convolution before them, as the converters fold them), for every layer the export keeps a tensor of.

    A weighted node's output belongs to its Keras layer (see :func:`onnx_node_layers`), or to the batch norm it
    absorbed; any other node's output to the layer its name names. When several tensors belong to one layer
    (a batch norm kept as Mul + Add, a MatMul and its bias Add) the last one in graph order is the output.
    Transposes only change the layout (tf2onnx names the input's NHWC -> NCHW transpose after the first
    batch norm) and are skipped.
    """

    node_layers = node_layers if node_layers is not None else onnx_node_layers(onnx_model, keras_model)
    names = {layer.name for layer in keras_model.layers}
    out: dict[str, str] = {}
    inputs = [layer.name for layer in keras_model.layers if type(layer).__name__ == "InputLayer"]
    graph_inputs = [
        i.name for i in onnx_model.graph.input if i.name not in {t.name for t in onnx_model.graph.initializer}
    ]
    if len(inputs) == 1 and len(graph_inputs) == 1:
        out[inputs[0]] = graph_inputs[0]
    for node in onnx_model.graph.node:
        if node.op_type in ("Transpose", "Constant", "Shape") or not node.output:
            continue
        if node.name in node_layers:
            layer = keras_output_layer(keras_model, node_layers[node.name])
        else:
            layer = segment_layer(node.output[0], names) or segment_layer(node.name, names)
        if layer is not None:
            out[layer] = node.output[0]
    # Zero padding merged into the convolution after it (tf2onnx does so) has no tensor of its own: its values are
    # its input's and zeros, so it takes its input's tensor (a symmetric range around zero covers both).
    for layer in keras_model.layers:
        if layer.name not in out and type(layer).__name__ in PASS_THROUGH_KERAS:
            inbound = getattr(layer, "_inbound_nodes", [])
            parents = inbound[0].parent_nodes if inbound else []
            if len(parents) == 1 and parents[0].operation.name in out:
                out[layer.name] = out[parents[0].operation.name]
    return out


def convert_to_onnx(
    model: Any,
    out_path: str | Path,
    spec: OnnxSpec = OnnxSpec(),
    manifest: dict[str, Any] | None = None,
    log_path: str | Path | None = None,
    reuse: bool = True,
) -> Artifact:
    """Export ``model`` to ``out_path`` (+ manifest); reuse an identical earlier export."""
    manifest = {**(manifest or {}), "precision": "fp32", "onnx_batch": spec.batch, "requested_opset": spec.opset}
    manifest.pop("calibration", None)
    build_key = sha256_json(manifest)
    if reuse and (existing := load_reusable(out_path, build_key)) is not None:
        return existing
    proto = keras_to_onnx(model, spec, log_path)
    return write_onnx_artifact(proto, out_path, {**manifest, "build_key": build_key})
