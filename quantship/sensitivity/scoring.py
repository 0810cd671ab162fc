"""Scoring a quantized variant against fp32 on held-out images (task metric, agreement, SQNR), and the
per-layer studies built on it: one layer at a time, cumulative, depthwise vs pointwise."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from quantship.config import Gate
from quantship.errors import ConfigError
from quantship.evaluate.loop import as_batch
from quantship.evaluate.tasks import Arrays, ClassificationTask, Task

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
