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
    """Every metric the task's data gives on ``output`` and on the fp32 reference, their differences, agreement
    with the reference, and output SQNR; ``metric``/``value``/``delta`` repeat the task's primary metric (top-1
    with labels, top-1 agreement with fp32 without). A label-free metric's reference value is fixed (agreement
    with itself 1, distance to itself 0)."""
    task = held.task
    arrays, ref = held.arrays(output), held.reference_arrays
    m, rm = task.evaluate(arrays, held.keys), task.evaluate(ref, held.keys)
    agreement = task.agreement(arrays, ref)
    out: dict[str, Any] = {}
    for name in task.measured:
        spec = task.spec(name)
        if spec.labelled:
            value, reference = m[name], rm[name]
        elif name in agreement and spec.reference_value is not None:
            value, reference = agreement[name], spec.reference_value
        else:
            continue  # a label-free metric this step does not compute (pseudo-mAP: sign-off gates only)
        out[name], out[f"reference_{name}"], out[f"delta_{name}"] = value, reference, value - reference
    out.update(agreement)
    out["sqnr_db"] = sqnr_db(held.reference, output)
    primary = task.primary if task.primary in out else next(iter(task.measured))
    out.update(metric=primary, value=out.get(primary), delta=out.get(f"delta_{primary}"))
    return out


def harm_key(row: dict[str, Any]) -> tuple[float, ...]:
    """Most harmful first: the primary metric's change, then top-1 agreement with fp32 (where the task has it),
    then the distance of the output distributions (larger first: without labels it separates layers that change
    no top-1 on a few images), then SQNR."""
    return (
        row["delta"] if row.get("delta") is not None else 0.0,
        row.get("agreement_top1", 1.0),
        -row.get("mean_l1", 0.0),
        row["sqnr_db"],
    )


def gate_passes(gate: Gate, metrics: dict[str, Any]) -> bool:
    """The gate on the metric it names, against the reference's value of that metric."""
    if gate.metric not in metrics:
        raise ConfigError(f"gate '{gate.describe()}': this task measures {metrics['metric']}, not {gate.metric}")
    return gate.evaluate(metrics[gate.metric], metrics[f"reference_{gate.metric}"])


def check_gate_reference(gate: Gate, held: HeldOut) -> None:
    """A gate relative to fp32 needs fp32 to score above 0 on the held-out images (``imagenet:`` photo folders
    labelled 0 score top-1 0): otherwise no float set can pass, and the search would walk every unit to learn it.

    Raises:
        ConfigError: fp32's value of the gate's metric is 0 under a relative gate.
    """
    if gate.relative is None or gate.metric not in held.task.measured:
        return
    reference = score(held.reference, held).get(f"reference_{gate.metric}")
    if reference is not None and reference <= 0:
        raise ConfigError(
            f"--gate {gate.describe()}: fp32's {gate.metric} on these {len(held.x)} held-out images is "
            f"{reference:g}, so no int8 model can pass it; label the images, or gate on agreement with fp32 "
            f"('agreement_top1>=0.99')"
        )


# ----------------------------------------------------------------------------------- layer sensitivity


# A single-layer study on at least twice this many images screens every layer on every other image first.
SCREEN_MIN_IMAGES = 100


def _outputs(backend: Any, x: np.ndarray, layers: Sequence[str], cumulative: bool) -> list[np.ndarray]:
    """Each layer's outputs on ``x`` (that layer alone quantized, or layers 0..k with ``cumulative``)."""
    if hasattr(backend, "run_layers"):
        return backend.run_layers(x, layers, cumulative)
    return [backend.run(x, only=layers[: k + 1] if cumulative else [layer]) for k, layer in enumerate(layers)]


def shows_no_harm(row: dict[str, Any]) -> bool:
    """The screening rule: the primary metric did not move and no top-1 changed (where the task has top-1)."""
    return (row.get("delta") or 0.0) == 0.0 and row.get("agreement_top1", 1.0) == 1.0


def layer_sensitivity(
    backend: Any,
    held: HeldOut,
    cumulative: bool = False,
    layers: Sequence[str] | None = None,
    screen_min: int | None = None,
) -> list[dict[str, Any]]:
    """One row per layer: that layer alone quantized (or layers 0..k with ``cumulative``).

    With ``screen_min`` (a single-layer study on at least twice that many images; the command passes
    :data:`SCREEN_MIN_IMAGES`), every layer first runs on every other image; a layer that shows no harm there
    (:func:`shows_no_harm`) is scored on those images only (its row: ``images`` that many, ``screened`` true), every
    other layer on all of them, with the numbers of the full study (up to the float rounding of another batching).
    So the harmful end of the ranking, the order the fallback takes, is the full study's; only the order among the
    layers that changed nothing on half the images rests on that half.
    """
    layers = list(layers or backend.layers)
    n = len(held.x)
    screening = screen_min is not None and not cumulative and n >= 2 * screen_min
    first, rest = (np.arange(0, n, 2), np.arange(1, n, 2)) if screening else (np.arange(n), np.arange(0))
    part = held.subset(first) if screening else held
    outs = _outputs(backend, part.x, layers, cumulative)
    scored = [score(out, part) for out in outs]
    harmful = [layer for layer, m in zip(layers, scored) if not screening or not shows_no_harm(m)]
    if screening and harmful:
        order = np.argsort(np.concatenate([first, rest]), kind="stable")
        more = dict(zip(harmful, _outputs(backend, held.x[rest], harmful, False)))
        for k, layer in enumerate(layers):
            if layer in more:
                scored[k] = score(np.concatenate([outs[k], more[layer]])[order], held)
    rows = []
    for k, layer in enumerate(layers):
        full = not screening or layer in harmful
        rows.append(
            {
                "kind": "cumulative" if cumulative else "single",
                "backend": backend.name,
                "index": k,
                "layer": layer,
                "quantized_layers": k + 1 if cumulative else 1,
                "images": n if full else len(first),
                "screened": not full,
                **scored[k],
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
                "images": len(held.x),
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
