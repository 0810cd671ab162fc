"""Which layers lose accuracy when quantized, how few bits their weights can keep, and which layers to keep
in float so an int8 model passes its gate.

* Layer sensitivity: quantize one layer at a time (the rest float), or layers 0..k cumulatively, for the
  Q/DQ ONNX model (TensorRT's placement; a layer = a weighted node with its input activation) and for TFLite
  full int8 (a deny list of the ops to keep in float; TFLite quantizes op outputs, and a tensor between a float
  op and an int8 op is quantized at that boundary, so a hostile activation is reached from both of its
  neighbours). In these studies every other op is float, pooling and softmax included; the fallback search
  keeps them int8. The converter calibrates once; each variant is only quantized. Measured: task metric, top-1
  agreement with fp32, output SQNR.
* Weight-precision studies on the Keras model: fp16 weights, int8 fixed point (max |w| -> 127, per tensor or
  per output channel), float32 mantissa truncation to k bits; per layer, all layers, or a mixed recipe.
* Depthwise vs pointwise: quantize only pointwise/dense layers vs all.
* Automatic fallback: rank by sensitivity, keep layers in float greedily until the gate passes on held-out
  images, apply the set to both the TFLite and the Q/DQ model, and report what it costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from quantship.config import CalibrationMethod, Gate, PtqSteps
from quantship.data.classes import class_name
from quantship.errors import ConfigError
from quantship.evaluate.loop import as_batch, runner_outputs
from quantship.evaluate.tasks import Arrays, ClassificationTask, Task
from quantship.progress import note
from quantship.runtime.base import RunnerOptions
from quantship.runtime.registry import make_runner

WEIGHT_KINDS = ("fp16", "int8-tensor", "int8-channel", "mantissa")


# ------------------------------------------------------------------------------------------- scoring


@dataclass
class HeldOut:
    """Preprocessed held-out images, their ground truth, the fp32 reference outputs and the task that scores
    outputs (classification when not given)."""

    x: np.ndarray
    labels: Sequence[Any]
    reference: np.ndarray
    task: Task = field(default_factory=ClassificationTask)
    keys: list[str] | None = None
    _reference_arrays: Arrays | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.keys is None:
            self.keys = [str(i) for i in range(len(self.x))]

    def subset(self, idx: Sequence[int]) -> "HeldOut":
        idx = np.asarray(idx)
        return HeldOut(
            self.x[idx], [self.labels[i] for i in idx], self.reference[idx], self.task, [self.keys[i] for i in idx]
        )

    def arrays(self, outputs: np.ndarray) -> Arrays:
        """The task's per-image arrays of outputs on these images."""
        return self.task.score(outputs, as_batch(self.keys, self.labels))

    @property
    def reference_arrays(self) -> Arrays:
        if self._reference_arrays is None:
            self._reference_arrays = self.arrays(self.reference)
        return self._reference_arrays


def in_batches(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = 32) -> np.ndarray:
    """``fn`` over ``x`` in batches, outputs concatenated (bounded memory on long held-out sets)."""
    return np.concatenate([np.asarray(fn(x[i : i + batch])) for i in range(0, len(x), batch)])


def sqnr_db(reference: np.ndarray, output: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``output`` against ``reference`` in dB (inf when identical)."""
    noise = float(np.sum((reference.astype(np.float64) - output) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def score(output: np.ndarray, held: HeldOut) -> dict[str, Any]:
    """Every metric of the task on ``output`` and on the fp32 reference, their differences, agreement with the
    reference, and output SQNR; ``metric``/``value``/``delta`` repeat the task's primary metric."""
    task = held.task
    arrays, ref = held.arrays(output), held.reference_arrays
    m, rm = task.evaluate(arrays, held.keys), task.evaluate(ref, held.keys)
    out: dict[str, Any] = {}
    for name in task.metrics:
        out[name], out[f"reference_{name}"], out[f"delta_{name}"] = m[name], rm[name], m[name] - rm[name]
    out.update(task.agreement(arrays, ref))
    out["sqnr_db"] = sqnr_db(held.reference, output)
    out.update(metric=task.primary, value=m[task.primary], delta=m[task.primary] - rm[task.primary])
    return out


def harm_key(row: dict[str, Any]) -> tuple[float, float, float]:
    """Most harmful first: the primary metric's change, then agreement with fp32 (where the task has it), then
    SQNR."""
    return (row["delta"], row.get(f"agreement_{row['metric']}", 1.0), row["sqnr_db"])


def gate_passes(gate: Gate, metrics: dict[str, Any]) -> bool:
    """The gate on the metric it names, against the reference's value of that metric."""
    if gate.metric not in metrics:
        raise ConfigError(f"gate '{gate.describe()}': this task measures {metrics['metric']}, not {gate.metric}")
    return gate.evaluate(metrics[gate.metric], metrics[f"reference_{gate.metric}"])


# ------------------------------------------------------------------------------------------ backends


class QdqBackend:
    """Runs the Q/DQ ONNX model with any subset of layers quantized (one calibration pass, reused).

    Each subset gets its own Q/DQ model and ONNX Runtime session: measured on EfficientNet-Lite0, writing the
    model takes 0.05 s and the session 0.1 s of CPU against 1.3 s to run 64 images, while one graph with a
    switch (``Where``) on every Q/DQ pair ran 2.3x slower per image (ONNX Runtime cannot pre-pack weights
    chosen at run time), so rebuilding is the fast way here.
    """

    name = "qdq"

    def __init__(
        self, onnx_model: Any, amax: dict[str, float], node_layers: dict[str, str], threads: int | None = None
    ):
        self.model, self.amax, self.node_layers, self.threads = onnx_model, amax, node_layers, threads
        order = [n.name for n in onnx_model.graph.node if n.name in node_layers]
        self.layers = list(dict.fromkeys(node_layers[n] for n in order))  # Keras names in graph order

    def run(self, x: np.ndarray, float_layers: Iterable[str] = (), only: Iterable[str] | None = None) -> np.ndarray:
        from quantship.calibrate.qdq import insert_qdq
        from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT, OnnxRunner

        model, _ = insert_qdq(self.model, self.amax, exclude=float_layers, node_layers=self.node_layers, include=only)
        with OnnxRunner(
            model.SerializeToString(), num_threads=self.threads, name="qdq", session_config=QDQ_FAKE_QUANT
        ) as runner:
            return runner_outputs(runner, x)

    def run_layers(self, x: np.ndarray, layers: Sequence[str], cumulative: bool = False) -> list[np.ndarray]:
        """:meth:`run` with ``only=[layer]`` (or ``only=layers[:k+1]``) for every layer, in graph order, without
        computing the same prefix twice: with one layer quantized, everything before it is the float model, so
        its inputs are carried from cut to cut through the float graph and only the rest of the network runs per
        layer; cumulatively, the part before layer k+1 is the same for every later row (layers 0..k quantized),
        so the float rest after it runs on the state the all-layers model reached there."""
        import onnx

        from quantship.calibrate.qdq import insert_qdq

        layers = list(layers)
        graph = _Cuts(onnx.shape_inference.infer_shapes(self.model), self.node_layers)
        if [layer for layer in graph.order if layer in set(layers)] != layers:
            return [self.run(x, only=layers[: k + 1] if cumulative else [layer]) for k, layer in enumerate(layers)]
        source = (
            self.model
            if not cumulative
            else insert_qdq(self.model, self.amax, node_layers=self.node_layers, include=layers)[0]
        )
        outputs: list[np.ndarray] = []
        state = {graph.inputs[0]: x}
        previous: list[str] = [graph.inputs[0]]
        for k, layer in enumerate(layers):
            cut = graph.position[layers[k + 1]] if cumulative and k + 1 < len(layers) else graph.position[layer]
            if cumulative and k + 1 == len(layers):
                outputs.append(self.run(x, only=layers))
                break
            live = graph.live(cut)
            state = self._advance(source, state, previous, live)
            previous = live
            only = layers[: k + 1] if cumulative else [layer]
            model, _ = insert_qdq(self.model, self.amax, node_layers=self.node_layers, include=only)
            outputs.append(self._suffix(model, live, state))
        return outputs

    def _session(self, model: Any) -> Any:
        from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT, make_session

        return make_session(model, self.threads, session_config=QDQ_FAKE_QUANT, what="Q/DQ model part")

    def _advance(
        self, model: Any, state: dict[str, np.ndarray], inputs: list[str], live: list[str]
    ) -> dict[str, np.ndarray]:
        """The values of the ``live`` tensors, computed from ``state`` (the values of ``inputs``)."""
        from onnx.utils import Extractor

        carried = {t: state[t] for t in live if t in state}
        wanted = [t for t in live if t not in state]
        if not wanted:
            return carried
        session = self._session(Extractor(_with_shapes(model)).extract_model(inputs, wanted))
        names = [i.name for i in session.get_inputs()]
        n = len(next(iter(state.values())))
        parts = [session.run(wanted, {t: state[t][i : i + 32] for t in names}) for i in range(0, n, 32)]
        return {**carried, **{t: np.concatenate([p[j] for p in parts]) for j, t in enumerate(wanted)}}

    def _suffix(self, model: Any, live: list[str], state: dict[str, np.ndarray]) -> np.ndarray:
        from onnx.utils import Extractor

        output = model.graph.output[0].name
        session = self._session(Extractor(_with_shapes(model)).extract_model(live, [output]))
        names = [i.name for i in session.get_inputs()]
        n = len(next(iter(state.values())))
        return np.concatenate(
            [session.run([output], {t: state[t][i : i + 32] for t in names})[0] for i in range(0, n, 32)]
        )


def _with_shapes(model: Any) -> Any:
    import onnx

    return onnx.shape_inference.infer_shapes(model)


class _Cuts:
    """Positions of the Keras layers' nodes in a topologically ordered ONNX graph, and the tensors alive at each
    position (made before it, read at or after it)."""

    def __init__(self, model: Any, node_layers: dict[str, str]):
        inits = {i.name for i in model.graph.initializer}
        self.inputs = [i.name for i in model.graph.input if i.name not in inits]
        self.position: dict[str, int] = {}
        self.order: list[str] = []
        made: dict[str, int] = {t: -1 for t in self.inputs}
        last: dict[str, int] = {}
        for i, node in enumerate(model.graph.node):
            layer = node_layers.get(node.name)
            if layer is not None and layer not in self.position:
                self.position[layer] = i
                self.order.append(layer)
            for t in node.output:
                made[t] = i
            for t in node.input:
                if t and t not in inits:
                    last[t] = i
        for o in model.graph.output:
            last[o.name] = len(model.graph.node)
        self._made, self._last = made, last

    def live(self, position: int) -> list[str]:
        return [t for t, i in self._made.items() if i < position and self._last.get(t, -2) >= position]


class TfliteBackend:
    """TFLite int8 with any set of Keras layers kept in float.

    Fast path (default): the converter calibrates once (its private calibrate-only path) and each set is only
    quantized, with the float layers' ops on the deny list; ``fast=False`` converts from scratch through the
    quantization debugger every time (calibration included: about 15 s a model for EfficientNet-Lite0).
    """

    name = "tflite"

    def __init__(
        self, converter: Any, calibration: Callable[[], Iterable], threads: int | None = None, fast: bool = True
    ):
        from quantship.convert.onnx import WEIGHTED_KERAS

        self.converter, self.calibration, self.threads, self.fast = converter, calibration, threads, fast
        self.layers = [layer.name for layer in converter.model.layers if type(layer).__name__ in WEIGHTED_KERAS]
        self._calibrated: bytes | None = None

    def model_bytes(self, floats: set[str], nodes: Iterable[str] = ()) -> bytes:
        """The int8 model with the ``floats`` layers' ops and the ``nodes`` ops kept in float."""
        from quantship.config import IODType, Precision
        from quantship.convert.tflite import TfliteSpec

        if not self.fast:
            spec = TfliteSpec(Precision.INT8, float_layers=tuple(sorted(floats)), float_nodes=tuple(nodes))
            return self.converter.convert(spec, self.calibration)
        if self._calibrated is None:
            self._calibrated = self.converter.calibrate_only(self.calibration)
        denied = list(dict.fromkeys([*self.converter.denylist_nodes(sorted(floats)), *nodes]))
        return self.converter.quantize_calibrated(self._calibrated, IODType.FLOAT32, float_nodes=denied)

    def run(self, x: np.ndarray, float_layers: Iterable[str] = (), only: Iterable[str] | None = None) -> np.ndarray:
        """Outputs with ``float_layers`` in float (the rest int8), or with only the ops of the ``only`` layers
        int8 (every other op float: pooling and a softmax too, which TFLite would otherwise quantize in every
        configuration and, on low-confidence images, cost more agreement than any one layer)."""
        from quantship.fileio import temp_dir

        floats = set(float_layers)
        nodes = self.converter.nodes_outside(only) if only is not None else []
        data = self.model_bytes(floats, nodes)
        with temp_dir(self.converter.work_dir, "sensitivity") as tmp:
            path = tmp / "m.tflite"
            path.write_bytes(data)
            with make_runner(path, RunnerOptions(threads=self.threads)) as r:
                return runner_outputs(r, x)


# ----------------------------------------------------------------------------------- layer sensitivity


def layer_sensitivity(
    backend: Any, held: HeldOut, cumulative: bool = False, layers: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """One row per layer: that layer alone quantized (or layers 0..k with ``cumulative``)."""
    layers = list(layers or backend.layers)
    rows = []
    shared = backend.run_layers(held.x, layers, cumulative) if hasattr(backend, "run_layers") else None
    for k, layer in enumerate(layers):
        only = layers[: k + 1] if cumulative else [layer]
        out = shared[k] if shared is not None else backend.run(held.x, only=only)
        rows.append(
            {
                "kind": "cumulative" if cumulative else "single",
                "backend": backend.name,
                "index": k,
                "layer": layer,
                "quantized_layers": len(only),
                **score(out, held),
            }
        )
    if not cumulative:
        rows.sort(key=harm_key)
        for rank, r in enumerate(rows, 1):
            r["rank"] = rank
    return rows


def depthwise_vs_pointwise(backend: Any, held: HeldOut, layer_types: dict[str, str]) -> list[dict[str, Any]]:
    """Quantize only pointwise (1x1) convolutions and dense layers, vs every layer with weights (other ops, pooling
    and softmax, are float in both rows)."""
    pointwise = [name for name in backend.layers if layer_types.get(name) in ("pointwise", "dense")]
    rows = []
    for label, only in (("pointwise+dense only", pointwise), ("all layers", list(backend.layers))):
        out = backend.run(held.x, only=only)
        rows.append(
            {
                "kind": "depthwise_vs_pointwise",
                "backend": backend.name,
                "setting": label,
                "quantized_layers": len(only),
                **score(out, held),
            }
        )
    return rows


def layer_types(model: Any) -> dict[str, str]:
    """Keras layer name -> depthwise / pointwise / conv / dense."""
    out = {}
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "DepthwiseConv2D":
            out[layer.name] = "depthwise"
        elif kind in ("Conv2D", "Conv1D"):
            out[layer.name] = "pointwise" if all(k == 1 for k in layer.kernel_size) else "conv"
        elif kind == "SeparableConv2D":
            out[layer.name] = "separable"
        elif kind == "Dense":
            out[layer.name] = "dense"
    return out


# -------------------------------------------------------------------------------------------- fallback


@dataclass
class FallbackResult:
    float_layers: list[str]
    passed: bool
    steps: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------- weight precision


def mantissa_truncate(w: np.ndarray, bits: int) -> np.ndarray:
    """Keep the top ``bits`` of float32's 23 mantissa bits (sign and exponent untouched); 23 is identity."""
    if not 0 <= bits <= 23:
        raise ConfigError(f"mantissa bits must be in 0..23, got {bits}")
    mask = np.uint32((0xFFFFFFFF << (23 - bits)) & 0xFFFFFFFF)
    return (np.ascontiguousarray(w, dtype=np.float32).view(np.uint32) & mask).view(np.float32)


def fixed_point_int8(w: np.ndarray, per_channel: bool) -> np.ndarray:
    """Symmetric int8: max |w| -> 127, over the tensor or per output channel (last axis), dequantized."""
    w = np.asarray(w, dtype=np.float32)
    if per_channel:
        amax = np.abs(w.reshape(-1, w.shape[-1])).max(axis=0)
    else:
        amax = np.abs(w).max()
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    return (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32)


def weight_variant(w: np.ndarray, kind: str, depthwise: bool = False) -> np.ndarray:
    """``fp16``, ``int8-tensor``, ``int8-channel`` or ``mantissa:K``.

    Output channels are the last axis of Conv2D/Dense kernels; a DepthwiseConv2D kernel (kh, kw, C, mult)
    has C * mult of them (``depthwise=True``).
    """
    if kind == "int8-channel" and depthwise:
        kh, kw = w.shape[:2]
        return fixed_point_int8(np.asarray(w).reshape(kh, kw, -1), per_channel=True).reshape(w.shape)
    if kind == "fp16":
        return np.asarray(w, np.float32).astype(np.float16).astype(np.float32)
    if kind == "int8-tensor":
        return fixed_point_int8(w, per_channel=False)
    if kind == "int8-channel":
        return fixed_point_int8(w, per_channel=True)
    if kind.startswith("mantissa:"):
        return mantissa_truncate(w, int(kind.split(":", 1)[1]))
    raise ConfigError(
        f"unknown weight precision '{kind}'; use fp16, int8-tensor, int8-channel or mantissa:K (K = 0..23)"
    )


def _kernels(model: Any) -> dict[str, int]:
    """Layer name -> index of its kernel among the layer's weights (convolutions and dense layers)."""
    from quantship.convert.onnx import WEIGHTED_KERAS

    return {layer.name: 0 for layer in model.layers if type(layer).__name__ in WEIGHTED_KERAS}


def apply_weight_recipe(model: Any, recipe: dict[str, str]) -> Callable[[], None]:
    """Replace kernels per ``{layer: kind}`` in place; returns a function that restores the originals."""
    saved = {}
    kernels = _kernels(model)
    for name, kind in recipe.items():
        if name not in kernels:
            raise ConfigError(f"'{name}' is not a convolution or dense layer of the model")
        layer = model.get_layer(name)
        weights = layer.get_weights()
        saved[name] = [w.copy() for w in weights]
        depthwise = type(layer).__name__ == "DepthwiseConv2D"
        weights[kernels[name]] = weight_variant(weights[kernels[name]], kind, depthwise)
        layer.set_weights(weights)

    def restore() -> None:
        for name, weights in saved.items():
            model.get_layer(name).set_weights(weights)

    return restore


def _predict(model: Any, x: np.ndarray) -> np.ndarray:
    return in_batches(lambda b: model(b, training=False), x)


def top3(probs: np.ndarray, n: int = 3) -> list[str]:
    """'label p' for the top classes of each of the first ``n`` images (the prediction check)."""
    out = []
    for p in probs[:n]:
        idx = np.argsort(-p, kind="stable")[:3]
        out.append(", ".join(f"{class_name(int(i)) if p.shape[-1] == 1000 else int(i)} {p[i]:.2f}" for i in idx))
    return out


def weight_study(
    model: Any,
    held: HeldOut,
    kinds: Sequence[str],
    per_layer: bool = False,
    recipe: dict[str, str] | None = None,
    ptq: PtqSteps | None = None,
    calib_batches: Callable[[], Iterable[np.ndarray]] | None = None,
) -> list[dict[str, Any]]:
    """Accuracy and a prediction check for each weight precision, for all layers at once (and per layer).

    With post-training steps (``ptq``), each all-layers precision is measured again on the model with the steps:
    batch norms folded, equalized, and with bias correction for *that* precision's weights (the expected shift
    of its own weight error, from the input means over ``calib_batches``).
    """
    rows = []
    layers = list(_kernels(model))
    configs: list[tuple[str, str, dict[str, str]]] = [(kind, "all", {name: kind for name in layers}) for kind in kinds]
    if per_layer:
        configs += [(kind, name, {name: kind}) for kind in kinds for name in layers]
    if recipe:
        configs.append(("recipe", "mixed", recipe))
    for kind, scope, rec in configs:
        restore = apply_weight_recipe(model, rec)
        try:
            out = _predict(model, held.x)
        finally:
            restore()
        check = top3(out) if held.task.name == "classification" else []
        rows.append(
            {
                "kind": "weights",
                "precision": kind,
                "layers": scope,
                "post_training": "none",
                **score(out, held),
                "prediction_check": check,
            }
        )
    if ptq is not None and ptq.active:
        rows += _weight_study_with_steps(model, held, kinds, ptq, calib_batches)
    return rows


def _weight_study_with_steps(
    model: Any,
    held: HeldOut,
    kinds: Sequence[str],
    ptq: PtqSteps,
    calib_batches: Callable[[], Iterable[np.ndarray]] | None,
) -> list[dict[str, Any]]:
    import dataclasses

    from quantship.convert.ptq import apply_bias_correction, bias_correction, biased_layers, input_means, prepare_model

    prepared, report = prepare_model(model, dataclasses.replace(ptq, bias_correct=False), calib_batches)
    means = None
    if ptq.bias_correct:
        if calib_batches is None:
            raise ConfigError("bias correction needs calibration images")
        means = input_means(prepared, biased_layers(prepared), calib_batches())
    rows = []
    layers = list(_kernels(prepared))
    for kind in kinds:
        corrections = {}
        if means is not None:
            corrections = bias_correction(prepared, means, lambda k, dw, kind=kind: weight_variant(k, kind, dw))
            apply_bias_correction(prepared, corrections)
        restore = apply_weight_recipe(prepared, {name: kind for name in layers})
        try:
            out = _predict(prepared, held.x)
        finally:
            restore()
            apply_bias_correction(prepared, {n: -d for n, d in corrections.items()})
        check = top3(out) if held.task.name == "classification" else []
        rows.append(
            {
                "kind": "weights",
                "precision": kind,
                "layers": "all",
                "post_training": ptq.label,
                "post_training_report": report.to_dict(),
                **score(out, held),
                "prediction_check": check,
            }
        )
    return rows


# --------------------------------------------------------------------------------------- orchestration


def combined_ranking(per_backend: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Layers ordered by their worst single-layer harm over the backends (top-1 change, agreement, SQNR)."""
    worst: dict[str, tuple] = {}
    for rows in per_backend.values():
        for r in rows:
            key = harm_key(r)
            worst[r["layer"]] = min(worst.get(r["layer"], key), key)
    return sorted(worst, key=lambda name: worst[name])


def find_fallback(
    backends: Sequence[Any], ranking: Sequence[str], verify: HeldOut, gate: Gate, max_layers: int | None = None
) -> FallbackResult:
    """Greedy float set that makes *every* backend pass ``gate`` on ``verify`` (one set for all of them)."""
    floats: list[str] = []
    steps: list[dict[str, Any]] = []
    limit = len(ranking) if max_layers is None else min(max_layers, len(ranking))
    for k in range(limit + 1):
        results = [(b.name, score(b.run(verify.x, float_layers=floats), verify)) for b in backends]
        ok = all(gate_passes(gate, m) for _, m in results)
        for name, m in results:
            steps.append(
                {"kind": "fallback", "backend": name, "float_layers": list(floats), "passed": gate_passes(gate, m), **m}
            )
        if ok:
            return FallbackResult(floats, True, steps)
        if k < limit:
            floats.append(ranking[k])
    return FallbackResult(floats, False, steps)


@dataclass
class SensitivitySetup:
    """Everything the analyses share for one model and dataset."""

    loaded: Any
    calib_batches: Callable[[], list[np.ndarray]]
    held: HeldOut
    onnx_path: Any
    node_layers: dict[str, str]
    work: Any
    threads: int | None = None
    _backends: dict[Any, Any] = field(default_factory=dict)

    def qdq(self, method: CalibrationMethod | str = CalibrationMethod.MAX) -> QdqBackend:
        """The Q/DQ backend (one per method; one statistics pass for all)."""
        import onnx

        from quantship.calibrate.api import calibrate, collect_statistics

        method = CalibrationMethod.parse(method)
        key = ("qdq", method)
        if key not in self._backends:
            proto = onnx.load(str(self.onnx_path))
            if not hasattr(self, "_collector"):
                self._collector = collect_statistics(proto, self.calib_batches(), scope="qdq", threads=self.threads)
            amax = calibrate(self._collector, method).amax
            self._backends[key] = QdqBackend(proto, amax, self.node_layers, self.threads)
        return self._backends[key]

    def tflite(self, fast: bool = True) -> TfliteBackend:
        """The TFLite backend (it calibrates once, on first use)."""
        from quantship.convert.tflite import TfliteConverter

        if not hasattr(self, "_converter"):
            self._converter = TfliteConverter(self.loaded.model, self.work / "convert.log", work_dir=self.work)
        key = ("tflite", fast)
        if key not in self._backends:
            self._backends[key] = TfliteBackend(self._converter, self.calib_batches, self.threads, fast=fast)
        return self._backends[key]

    def close(self) -> None:
        if hasattr(self, "_converter"):
            self._converter.close()


def prepare(
    model: str,
    weights: str | None,
    data: str,
    labels: str | None,
    images: int,
    calib_images: int,
    work: Any,
    preprocess_overrides: dict | None = None,
    seed: int = 0,
    threads: int | None = None,
    workers: int = 4,
    anchors: str | None = None,
    allow_missing_images: bool = False,
    trust_savedmodel: bool = False,
    calib_data: str | None = None,
    calib_list: str | None = None,
) -> SensitivitySetup:
    """Load the model, split the data (calibration / held-out), compute fp32 outputs, export ONNX.

    Calibration images come from ``calib_data`` when given (then the held-out images are the first ``images``
    of ``data``), restricted to the files ``calib_list`` names when given; otherwise they are drawn from
    ``data``, disjoint from the held-out images."""
    from pathlib import Path

    import onnx

    from quantship.config import CalibrationSpec
    from quantship.convert.onnx import convert_to_onnx, onnx_node_layers
    from quantship.data.datasets import iter_batches, split_calibration
    from quantship.evaluate.tasks import make_task
    from quantship.jobs.common import (
        calibration_data,
        calibration_source,
        load_evaluation_data,
        load_for,
        split_run_data,
    )
    from quantship.models.loading import resolve_preprocess

    work = Path(work)
    preprocess = resolve_preprocess(model, weights, preprocess_overrides)
    dataset = load_evaluation_data(data, labels, allow_missing_images)
    calibration = CalibrationSpec(num_images=calib_images, seed=seed, data=calib_data, list=calib_list)
    source = calibration_source(calibration, dataset)
    if source.pool is None:
        calib, held_set = split_calibration(
            dataset, calib_images, limit=min(images, len(dataset) - calib_images), seed=seed
        )
    else:
        calib, held_set = split_run_data(dataset, calibration, source, images, needed=True)
    loaded = load_for(model, weights, preprocess, dataset, trust_savedmodel=trust_savedmodel)
    task = make_task(dataset, loaded, anchors)
    xs, ys, keys = [], [], []
    for b in iter_batches(held_set, loaded.preprocess.with_overrides(crops="center"), 32, workers):
        xs.append(b.inputs[:, 0])
        ys += list(b.labels)
        keys += list(b.keys)
    if not xs:
        from quantship.errors import DataError

        raise DataError(f"{dataset.source}: none of the {len(held_set)} held-out images could be read")
    x = np.concatenate(xs)
    reference = _predict(loaded.model, x)
    manifest = {"source_model": {"name": loaded.name, "weights": loaded.weights}}
    onnx_art = convert_to_onnx(
        loaded.model,
        work / "artifacts" / f"{loaded.name}-onnx-fp32.onnx",
        manifest=manifest,
        log_path=work / "convert.log",
    )
    node_layers = onnx_node_layers(onnx.load(str(onnx_art.path)), loaded.model)
    return SensitivitySetup(
        loaded,
        calibration_data(calib, loaded, workers=workers, source=source).batches,
        HeldOut(x, ys, reference, task, keys),
        onnx_art.path,
        node_layers,
        work,
        threads,
    )


def apply_fallback(
    setup: SensitivitySetup,
    float_layers: Sequence[str],
    method: CalibrationMethod | str = CalibrationMethod.MAX,
    threads: int = 2,
) -> list[dict[str, Any]]:
    """Write the TFLite and Q/DQ int8 models with ``float_layers`` in float next to the plain int8 ones, and
    report what the fallback costs (file size, batch-1 latency) and gains (held-out metrics)."""
    from quantship.calibrate.qdq import insert_qdq
    from quantship.evaluate.latency import measure_latency
    from quantship.manifest import write_artifact
    from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT

    method = CalibrationMethod.parse(method)
    art_dir = setup.work / "artifacts"
    name = setup.loaded.name
    base_manifest = {
        "source_model": {"name": name, "weights": setup.loaded.weights},
        "float_layers": list(float_layers),
    }
    rows = []
    tfl = setup.tflite()
    qdq = setup.qdq(method)
    for label, floats in (("int8", ()), ("int8+fallback", tuple(float_layers))):
        path = art_dir / f"{name}-tflite-{label.replace('+', '-')}.tflite"
        write_artifact(
            path,
            tfl.model_bytes(set(floats)),
            {**base_manifest, "format": "tflite", "precision": label, "float_layers": list(floats)},
        )
        model, _ = insert_qdq(qdq.model, qdq.amax, exclude=floats, node_layers=qdq.node_layers)
        opath = art_dir / f"{name}-qdq-{method.value}-{label.replace('+', '-')}.onnx"
        write_artifact(
            opath,
            model.SerializeToString(),
            {
                **base_manifest,
                "format": "onnx",
                "precision": f"{label} (Q/DQ)",
                "float_layers": list(floats),
                "calibration_method": method.value,
            },
        )
        for backend, p, session in (("tflite", path, ()), ("qdq", opath, QDQ_FAKE_QUANT)):
            with make_runner(p, RunnerOptions(threads=threads, session_config=session)) as r:
                out = runner_outputs(r, setup.held.x)
                lat = measure_latency(r, setup.held.x[:1], warmup=5, min_iters=30)
            rows.append(
                {
                    "kind": "fallback_cost",
                    "backend": backend,
                    "variant": label,
                    "float_layers": list(floats),
                    "artifact": str(p),
                    "size_mb": p.stat().st_size / 1e6,
                    "latency_ms_p50": lat["latency_ms_p50"],
                    **score(out, setup.held),
                }
            )
    return rows


@dataclass
class Analyses:
    """Which analyses to run (``quantship sensitivity``; ``convert --auto-fallback`` is the gate alone)."""

    backends: tuple[str, ...] = ("qdq", "tflite")
    method: CalibrationMethod = CalibrationMethod.MAX
    cumulative: bool = False
    depthwise: bool = False
    weight_kinds: tuple[str, ...] = ()
    per_layer: bool = False
    recipe: dict[str, str] | None = None
    gate: Gate | None = None
    ptq: PtqSteps = field(default_factory=PtqSteps)  # shown in the weight study
    fast: bool = True  # TFLite: calibrate once, then only quantize each variant (False: convert each from scratch)

    def __post_init__(self) -> None:
        self.method = CalibrationMethod.parse(self.method)
        unknown = set(self.backends) - {"qdq", "tflite"}
        if unknown or not self.backends:
            raise ConfigError(f"unknown or no backend(s) {sorted(unknown)}; use qdq and/or tflite")
        for kind in self.weight_kinds:
            weight_variant(np.zeros((1, 1), np.float32), kind)  # unknown kinds fail before any work


def run_analyses(
    setup: SensitivitySetup,
    analyses: Analyses,
    threads: int | None = None,
    print_fn: Callable[[str], None] = lambda s: None,
) -> tuple[list[dict[str, Any]], FallbackResult | None]:
    """Every analysis asked for, as flat rows. With a gate, layers are ranked on half of the held-out images
    and the fallback is verified on the other half, then applied and costed."""
    a = analyses
    if a.gate is not None:
        setup.held.task.check_metric(a.gate.metric)
    chosen = {"qdq": lambda: setup.qdq(a.method), "tflite": lambda: setup.tflite(fast=a.fast)}
    idx = np.arange(len(setup.held.x))
    rank_set = setup.held.subset(idx[0::2]) if a.gate is not None else setup.held
    rows: list[dict[str, Any]] = []
    per_backend = {}
    for name in a.backends:
        backend = chosen[name]()
        print_fn(f"{name}: {len(backend.layers)} layers, one at a time, on {len(rank_set.x)} held-out images")
        per_backend[name] = layer_sensitivity(backend, rank_set)
        rows += per_backend[name]
        if a.cumulative:
            rows += layer_sensitivity(backend, setup.held, cumulative=True)
        if a.depthwise:
            rows += depthwise_vs_pointwise(backend, setup.held, layer_types(setup.loaded.model))
    if a.weight_kinds or a.recipe:
        rows += weight_study(
            setup.loaded.model,
            setup.held,
            a.weight_kinds,
            per_layer=a.per_layer,
            recipe=a.recipe,
            ptq=a.ptq,
            calib_batches=setup.calib_batches,
        )
    result = None
    if a.gate is not None and per_backend:
        ranking = combined_ranking(per_backend)
        result = find_fallback([chosen[n]() for n in a.backends], ranking, setup.held.subset(idx[1::2]), a.gate)
        rows += result.steps
        verdict = "passes" if result.passed else "still FAILS"
        if not result.passed and len(result.float_layers) == len(ranking):
            verdict += (
                " with every layer that has weights in float: what is left in int8 lies outside them (residual "
                "adds, pooling, TFLite's softmax), so no layer set meets this gate"
            )
        print_fn(
            f"fallback for gate '{a.gate.describe()}': float layers {result.float_layers or 'none needed'}; "
            f"{verdict} on held-out images"
        )
        if result.float_layers:
            rows += apply_fallback(setup, result.float_layers, a.method, threads=threads or 2)
    return rows, result


SENSITIVITY_SHOWN = (
    ("backend", "backend", "{}"),
    ("rank", "rank", "{}"),
    ("layer", "layer", "{}"),
    ("metric", "metric", "{}"),
    ("value", "value", "{:.4f}"),
    ("delta", "Δ", "{:+.4f}"),
    ("agreement_top1", "agree", "{:.4f}"),
    ("sqnr_db", "SQNR dB", "{:.1f}"),
)


WEIGHTS_SHOWN = (
    ("precision", "weights", "{}"),
    ("post_training", "post-training", "{}"),
    ("metric", "metric", "{}"),
    ("value", "value", "{:.4f}"),
    ("delta", "Δ", "{:+.4f}"),
    ("agreement_top1", "agree", "{:.4f}"),
    ("sqnr_db", "SQNR dB", "{:.1f}"),
)


def run_sensitivity(
    setup_args: dict[str, Any],
    analyses: Analyses,
    out: Any,
    threads: int | None = None,
    show: int = 10,
    jsonl_name: str = "sensitivity.jsonl",
    report: bool = True,
) -> Any:
    """``quantship sensitivity`` (and ``convert --auto-fallback``, which asks for the gate alone): prepare, run the
    analyses, write the rows (and the report); the exit code is 1 when a gate is asked for and some backend
    still fails it."""
    import json
    from pathlib import Path

    from quantship.evaluate.report import build_report
    from quantship.evaluate.results import text_table
    from quantship.fileio import FolderLock, write_text_atomic
    from quantship.jobs import JobResult

    out = Path(out)
    lines: list[str] = []
    with FolderLock(out, f"quantship sensitivity {setup_args.get('model')}"):
        setup = prepare(**setup_args, work=out, threads=threads)
        try:
            rows, result = run_analyses(setup, analyses, threads=threads, print_fn=note)
        finally:
            setup.close()
    write_text_atomic(out / jsonl_name, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows))
    single = [r for r in rows if r["kind"] == "single"]
    if single:
        lines.append(text_table(single[: len(analyses.backends) * show], SENSITIVITY_SHOWN))
    weights = [r for r in rows if r["kind"] == "weights" and r["layers"] in ("all", "mixed")]
    if weights:
        lines.append("weight study (all layers at once; post-training steps as asked):")
        lines.append(text_table(weights, WEIGHTS_SHOWN))
    for r in rows:
        if r["kind"] == "fallback_cost":
            lines.append(
                f"{r['backend']:7s} {r['variant']:14s} {r['artifact']}: {r['metric']} {r['value']:.4f}, "
                f"{r['size_mb']:.2f} MB, p50 {r['latency_ms_p50']:.2f} ms"
            )
    if report:
        md, page = build_report(out, f"sensitivity: {setup.loaded.name}")
        lines.append(f"results: {out / jsonl_name}; report: {page}, {md}")
    else:
        lines.append(f"results: {out / jsonl_name}")
    return JobResult(rows, lines, 1 if (result is not None and not result.passed) else 0)
