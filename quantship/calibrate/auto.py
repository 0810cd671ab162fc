"""Per-layer choice of calibration method (``--method auto``): for each tensor, the range among max / entropy /
percentile / mse that gives the smallest output error on calibration images.

A tensor read by a convolution or matrix product is judged by that layer's output: the layer is run with its
input fake-quantized (symmetric int8, each candidate's scale) and its int8 weights, against the float layer on
the float input; the error is the squared difference relative to the float output's energy, summed over the
layer's consumers. Any other tensor (a residual branch into an Add, a pooling input, the outputs TFLite also
quantizes) is judged by its own quantization error over its whole histogram. The candidates' ranges come from
the full statistics pass; a layer's output error is measured on the calibration images the collector kept (a
seeded uniform draw, one image at a time, so memory is one image's activations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from quantship.calibrate.calibrators import AUTO_CANDIDATES as CANDIDATES  # noqa: E402
from quantship.calibrate.calibrators import compute_ranges, get_calibrator
from quantship.calibrate.int8 import INT8_MAX, quantize_weight
from quantship.config import CalibrationMethod
from quantship.lazy import lazy_import
from quantship.runtime.onnxruntime import make_session

WEIGHTED = ("Conv", "Gemm", "MatMul")


@dataclass
class AutoChoice:
    amax: dict[str, float]
    chosen: dict[str, str]
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # tensor -> method -> relative error


def _layer_model(node: Any, inits: dict[str, Any], candidates: int) -> Any | None:
    """The node alone, twice: on its input fake-quantized at ``candidates`` scales (the batch axis carries the
    candidates), with int8 weights; and on the float input with float weights (the reference)."""
    onnx = lazy_import("onnx")
    from onnx import helper, numpy_helper

    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    if node.op_type == "MatMul" and w.ndim != 2:
        return None
    axis = 0 if node.op_type == "Conv" else (1 if node.op_type == "MatMul" else None)
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        axis = 0 if trans_b else 1
    q, scale = quantize_weight(w, axis)
    shape = [1] * w.ndim
    shape[axis] = -1
    wq = (q.astype(np.float32) * scale.reshape(shape)).astype(np.float32)
    extra = [numpy_helper.to_array(inits[i]) for i in node.input[2:] if i in inits]
    if len(extra) != len(node.input[2:]):
        return None
    init = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(wq, "wq")]
    init += [numpy_helper.from_array(e, f"b{k}") for k, e in enumerate(extra)]
    bias = [f"b{k}" for k in range(len(extra))]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    nodes = [
        helper.make_node("QuantizeLinear", ["xc", "s", "zp"], ["q"], axis=0),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"], axis=0),
        helper.make_node(node.op_type, ["dq", "wq", *bias], ["yq"], **attrs),
        helper.make_node(node.op_type, ["x", "w", *bias], ["y"], **attrs),
    ]
    f = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "layer",
        [
            helper.make_tensor_value_info("xc", f, None),
            helper.make_tensor_value_info("x", f, None),
            helper.make_tensor_value_info("s", f, [None]),
            helper.make_tensor_value_info("zp", onnx.TensorProto.INT8, [None]),
        ],
        [helper.make_tensor_value_info("yq", f, None), helper.make_tensor_value_info("y", f, None)],
        init,
    )
    opset = [helper.make_opsetid("", 17)]
    return helper.make_model(graph, opset_imports=opset, ir_version=8)


def own_error(stats: Any, amaxes: np.ndarray) -> np.ndarray:
    """Relative squared error of symmetric int8 fake-quantization of a tensor at each amax, over its whole
    histogram of |x| (bin centres stand for their values)."""
    counts = stats.counts.astype(np.float64)
    centers = (np.arange(len(counts), dtype=np.float64) + 0.5) * stats.width
    energy = float(np.sum(counts * centers**2)) or 1.0
    scale = np.asarray(amaxes, np.float64)[:, None] / INT8_MAX
    q = np.clip(np.round(centers[None, :] / scale), -INT8_MAX - 1, INT8_MAX) * scale
    return ((q - centers[None, :]) ** 2 * counts[None, :]).sum(axis=1) / energy


def choose_ranges(
    model: Any,
    stats: dict[str, Any],
    sample: Sequence[dict[str, np.ndarray]],
    percentile: float | None = None,
    threads: int | None = None,
    candidates: Sequence[CalibrationMethod] = CANDIDATES,
    per_method: dict[CalibrationMethod, dict[str, float]] | None = None,
) -> AutoChoice:
    """For every observed tensor, the candidate range with the smallest output error on ``sample``.

    Args:
        model: The float ``onnx.ModelProto`` the statistics were collected on.
        stats: Tensor -> :class:`TensorStats` (the full calibration pass).
        sample: Calibration input batches to measure errors on.
        percentile: Of the percentile candidate.
        threads: ONNX Runtime threads.
        per_method: The candidates' ranges when already computed.
    """
    onnx = lazy_import("onnx")

    if per_method is None:
        per_method = {m: compute_ranges(stats, get_calibrator(m, percentile)) for m in candidates}
    tensors = [t for t in stats if all(t in per_method[m] for m in candidates)]
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layer_sessions: dict[str, Any] = {}
    weighted: dict[str, list[str]] = {}
    for t in tensors:
        for node in consumers.get(t, []):
            if node.op_type in WEIGHTED and node.input[0] == t:
                if node.name not in layer_sessions:
                    proto = _layer_model(node, inits, len(candidates))
                    layer_sessions[node.name] = (
                        make_session(proto, threads, optimization="disable", what="auto calibration layer")
                        if proto is not None
                        else None
                    )
                if layer_sessions[node.name] is not None:
                    weighted.setdefault(t, []).append(node.name)

    amaxes = {t: np.array([per_method[m][t] for m in candidates], np.float32) for t in tensors}
    errors = {t: own_error(stats[t], amaxes[t]) for t in tensors if t not in weighted}
    errors.update({t: np.zeros(len(candidates)) for t in weighted})
    observed = list(weighted)
    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    existing = {o.name for o in aug.graph.output}
    for t in observed:
        if t not in existing:
            aug.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    session = make_session(aug, threads, optimization="disable", what="auto calibration model") if observed else None
    k = len(candidates)
    for batch in sample if observed else ():
        for i in range(next(iter(batch.values())).shape[0]):
            one = {name: v[i : i + 1] for name, v in batch.items()}
            values = dict(zip(observed, session.run(observed, one)))
            for t in observed:
                x = values[t]
                xc = np.repeat(x, k, axis=0)
                feed = {
                    "xc": xc,
                    "x": x,
                    "s": (amaxes[t] / INT8_MAX).astype(np.float32),
                    "zp": np.zeros(k, np.int8),
                }
                for name in weighted[t]:
                    yq, y = layer_sessions[name].run(["yq", "y"], feed)
                    energy = float(np.mean(y.astype(np.float64) ** 2)) or 1.0
                    diff = (yq.astype(np.float64) - y).reshape(k, -1)
                    errors[t] += np.mean(diff**2, axis=1) / energy
    amax, chosen, table = {}, {}, {}
    for t in tensors:
        best = int(np.argmin(errors[t]))
        amax[t] = per_method[candidates[best]][t]
        chosen[t] = candidates[best].value
        table[t] = {m.value: float(e) for m, e in zip(candidates, errors[t])}
    return AutoChoice(amax, chosen, table)
