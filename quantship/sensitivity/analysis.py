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

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from quantship.config import CalibrationMethod, Gate, PtqSteps
from quantship.errors import ConfigError
from quantship.sensitivity.fallback import (
    FallbackResult,
    apply_fallback,
    closest_set,
    combined_ranking,
    find_fallback,
    prune_fallback,
)
from quantship.sensitivity.scoring import (
    SCREEN_MIN_IMAGES,
    check_gate_reference,
    depthwise_vs_pointwise,
    layer_sensitivity,
    layer_types,
)
from quantship.sensitivity.setup import SensitivitySetup
from quantship.sensitivity.units import unit_backends, unit_sensitivity
from quantship.sensitivity.weights import weight_study, weight_variant


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
    ops: bool = True  # the fallback may also keep softmax, residual adds, pooling and the output op in float

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
        check_gate_reference(a.gate, setup.held)
    chosen = {"qdq": lambda: setup.qdq(a.method), "tflite": lambda: setup.tflite(fast=a.fast)}
    idx = np.arange(len(setup.held.x))
    # Ranking half: the gate ranks on it (and verifies on the other); the cumulative and depthwise studies, whose
    # rows are read as curves rather than ranked, always run on it (half the variant runs).
    half = setup.held.subset(idx[0::2])
    rank_set = half if a.gate is not None else setup.held
    rows: list[dict[str, Any]] = []
    per_backend = {}
    for name in a.backends:
        backend = chosen[name]()
        print_fn(f"{name}: {len(backend.layers)} layers, one at a time, on {len(rank_set.x)} held-out images")
        per_backend[name] = layer_sensitivity(backend, rank_set, screen_min=SCREEN_MIN_IMAGES)
        rows += per_backend[name]
        screened = [r for r in per_backend[name] if r.get("screened")]
        if screened:
            print_fn(
                f"{name}: {len(screened)} of {len(backend.layers)} layers changed no top-1 and no metric on every "
                f"other held-out image ({screened[0]['images']}): scored on those only, the rest on all "
                f"{len(rank_set.x)}"
            )
        if a.cumulative or a.depthwise:
            print_fn(f"{name}: cumulative/depthwise studies on every other held-out image ({len(half.x)})")
        if a.cumulative:
            rows += layer_sensitivity(backend, half, cumulative=True)
        if a.depthwise:
            rows += depthwise_vs_pointwise(backend, half, layer_types(setup.loaded.model))
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
        verify = setup.held.subset(idx[1::2])
        backends = [chosen[n]() for n in a.backends]
        wrapped = None
        if a.ops:
            wrapped = unit_backends(setup, {n: chosen[n]() for n in a.backends})
            for name, w in wrapped.items():
                print_fn(f"{name}: {len(w.units)} op units (softmax, adds, pooling, output), one at a time")
                unit_rows = unit_sensitivity(w, rank_set)
                per_backend[name] = per_backend[name] + unit_rows
                rows += unit_rows
            backends = list(wrapped.values())
        ranking = combined_ranking(per_backend)
        result = find_fallback(backends, ranking, verify, a.gate)
        if result.passed and wrapped is not None and result.float_layers:
            pruned, steps = prune_fallback(backends, result.float_layers, verify, a.gate)
            result = FallbackResult(pruned, True, result.steps + steps)
        rows += result.steps
        verdict = "passes" if result.passed else "still FAILS"
        if not result.passed and len(result.float_layers) == len(ranking):
            verdict += (
                " with every layer that has weights and every op unit in float: the gate cannot be met by a float "
                "fallback here"
                if wrapped is not None
                else " with every layer that has weights in float: what is left in int8 lies outside them "
                "(residual adds, pooling, TFLite's softmax), so no layer set meets this gate; without "
                "--weighted-only the fallback may keep those in float too"
            )
        print_fn(
            f"fallback for gate '{a.gate.describe()}': float set {result.float_layers or 'none needed'}; "
            f"{verdict} on held-out images"
        )
        applied = result.float_layers
        closest = None if result.passed else closest_set(result.steps, a.gate)
        if closest is not None:
            # A failed search writes and reports the set that got nearest, not merely the last one it tried.
            applied, values = closest
            reached = ", ".join(f"{b} {v:.4f}" for b, v in values.items())
            print_fn(
                f"closest: float set {applied or 'none'} ({len(applied)} of {len(ranking)}) reaches {reached} "
                f"of the gated quantity (gate: {a.gate.describe()})"
            )
            rows.append({"kind": "fallback_closest", "float_layers": applied, "gate_values": values})
        if applied:
            rows += apply_fallback(setup, applied, a.method, threads=threads or 2, units=a.ops)
    return rows, result
