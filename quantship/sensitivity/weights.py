"""Weight-precision studies on the Keras model: fp16 weights, int8 fixed point (per tensor or per output channel),
float32 mantissa truncation; per layer, all layers at once, or a mixed recipe."""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from quantship.config import PtqSteps
from quantship.convert.layer_names import WEIGHTED_KERAS
from quantship.convert.ptq import apply_bias_correction, bias_correction, biased_layers, input_means, prepare_model
from quantship.data.classes import class_name
from quantship.errors import ConfigError
from quantship.lazy import lazy_import
from quantship.sensitivity.scoring import HeldOut, in_batches, score

WEIGHT_KINDS = ("fp16", "int8-tensor", "int8-channel", "mantissa")


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


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def predict(model: Any, x: np.ndarray) -> np.ndarray:
    """The Keras model's outputs on ``x``, through one ``tf.function`` per model: measured on EfficientNet-Lite0,
    eager calls spent 2.2x the CPU time (the study predicts the reference and every weight precision). The
    function reads the weights' variables at each call, so the weight study's in-place changes reach it, and
    the reference and the variants go through the same graph (``mantissa:23`` stays bit-identical)."""
    fn = _COMPILED.get(model)
    if fn is None:
        tf = lazy_import("tensorflow")
        fn = _COMPILED[model] = tf.function(lambda b: model(b, training=False), reduce_retracing=True)
    return in_batches(fn, x)


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
            out = predict(model, held.x)
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
            out = predict(prepared, held.x)
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
