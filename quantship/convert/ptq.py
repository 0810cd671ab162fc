"""Post-training steps on the Keras model, before any export, so TFLite, the Q/DQ model and TensorRT all get
them: batch-norm folding, cross-layer equalization and bias correction (Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction", ICCV 2019), and AdaRound (:mod:`quantship.convert.adaround`).

* Folding: an equivalent Keras model in which every batch norm that follows a convolution or dense layer (its
  only consumer) is folded into that layer's kernel and bias. The folded layers keep their names; the batch
  norms disappear. The converters fold them too, so this changes nothing by itself: it gives equalization and
  bias correction the weights the int8 model will really have.
* Cross-layer equalization: for consecutive layers W1 -> [ReLU / ReLU6] -> [zero padding, global average
  pooling] -> W2 (pointwise, depthwise or dense, in any order), output channel i of W1 and its bias are divided
  by s_i and input channel i of W2 is multiplied by s_i, with s_i = sqrt(r1_i / r2_i) (r = the channel's
  weight range max|w|): both channels then have range sqrt(r1_i * r2_i). Positive scaling commutes with ReLU,
  so through ReLU (and through a linear link) the model computes exactly the same function. ReLU6 clips at a
  fixed 6, which does not commute with scaling: after dividing W1's channel by s and multiplying W2's by s,
  the channel is clipped at 6 s instead of 6, so the function is unchanged only where its values stay below
  min(6, 6 s). Three ways through (``PtqSteps.relu6``), each s being the published sqrt(r1 / r2) moved into the
  allowed interval, from the channel's largest ReLU6 output m over the calibration images (a channel that
  reaches 6 always keeps s = 1, one that stays at 0 is never scaled up):

  - ``keep`` (default): scale up only (s <= 1), at most until 2 m reaches 6. Exact wherever the channel stays
    below twice its calibration maximum.
  - ``calibration``: scale up until m reaches 6, or down: exact on the calibration images only; on others a
    channel is clipped at its calibration maximum (scaled up) or above 6 (scaled down).
  - ``relu``: the published method, ReLU6 between two equalized layers becomes ReLU: exact equalization of a
    different float model.

  Measured on the photo crops of benchmarks/int8_fidelity.py (calibrated on crops of other photos), top-1
  agreement of the equalized float model with the original: MobileNetV2 0.998 (keep), 0.984 (calibration),
  0.92 (relu); EfficientNet-Lite0 0.976 (keep), 0.90 (calibration). Each pair is equalized again until the
  scales settle (a depthwise layer is W2 of one pair and W1 of the next), as the paper does.
* Bias correction: int8 weights W_q shift each output by E[(W_q - W) x]; with the per-input-channel mean
  E[x] of every layer's input over the calibration images (a pass through the float model), that expected
  shift is subtracted from the layer's bias: for a convolution sum over kernel positions and input channels,
  for a depthwise convolution per channel. W_q is the per-output-channel symmetric int8 quantization that
  TFLite, the Q/DQ model and TensorRT all use (or any other weight quantizer given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from quantship.config import PtqSteps
from quantship.convert.adaround import adaround_cached
from quantship.errors import ConfigError, ConversionError
from quantship.lazy import lazy_import

WEIGHTED = ("Conv2D", "DepthwiseConv2D", "Dense")
# Layers that may sit between two equalized layers: each keeps channels apart and commutes with a positive
# per-channel scale.
LINK_LAYERS = ("ZeroPadding2D", "GlobalAveragePooling2D", "Dropout")


@dataclass
class PtqReport:
    """What the steps did."""

    steps: PtqSteps
    folded: list[str] = field(default_factory=list)  # batch norms folded away
    pairs: list[tuple[str, str]] = field(default_factory=list)  # equalized (W1, W2)
    relu6_replaced: list[str] = field(default_factory=list)
    relu6_pairs: int = 0  # equalized through a ReLU6 kept as it is (exact on the calibration images)
    relu6_channels_at_clip: int = 0  # channels of those links that reach 6 and so keep s = 1
    iterations: int = 0
    range_ratio_before: float = 0.0  # mean over pairs of max(r1/r2, r2/r1), over channels (geometric mean)
    range_ratio_after: float = 0.0
    corrected: list[str] = field(default_factory=list)  # layers whose bias was corrected
    mean_abs_correction: float = 0.0
    adaround: Any = None  # quantship.convert.adaround.AdaRoundReport

    def to_dict(self) -> dict[str, Any]:
        return {
            **(self.adaround.to_dict() if self.adaround is not None else {}),
            **self.steps.describe(),
            "batch_norms_folded": len(self.folded),
            "equalized_pairs": len(self.pairs),
            "relu6_replaced_by_relu": self.relu6_replaced,
            "equalized_through_relu6": self.relu6_pairs,
            "relu6_channels_at_clip": self.relu6_channels_at_clip,
            "equalization_iterations": self.iterations,
            "channel_range_ratio_before": round(self.range_ratio_before, 4),
            "channel_range_ratio_after": round(self.range_ratio_after, 4),
            "bias_corrected_layers": len(self.corrected),
            "mean_abs_bias_correction": self.mean_abs_correction,
        }


# ------------------------------------------------------------------------------------------ graph walking


def _parents(layer: Any) -> list[Any]:
    nodes = getattr(layer, "_inbound_nodes", [])
    return [p.operation for p in nodes[0].parent_nodes] if nodes else []


def _consumers(model: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {layer.name: [] for layer in model.layers}
    for layer in model.layers:
        for parent in _parents(layer):
            out[parent.name].append(layer)
    return out


def _kind(layer: Any) -> str:
    return type(layer).__name__


def _activation(layer: Any) -> str | None:
    """``linear``, ``relu`` or ``relu6`` for a layer that is (or ends in) one of them, else None."""
    kind = _kind(layer)
    if kind == "ReLU":
        cfg = layer.get_config()
        if cfg.get("negative_slope", 0) or cfg.get("threshold", 0):
            return None
        mv = cfg.get("max_value")
        return "relu" if mv is None else ("relu6" if float(mv) == 6.0 else None)
    act = getattr(layer, "activation", None)
    name = getattr(act, "__name__", None) if act is not None else "linear"
    return name if name in ("linear", "relu", "relu6") else None


def _foldable(model: Any) -> dict[str, str]:
    """Weighted layer -> the batch norm (its only consumer, on the channel axis) folded into it."""
    consumers = _consumers(model)
    out = {}
    for layer in model.layers:
        if _kind(layer) not in WEIGHTED or _activation(layer) != "linear":
            continue
        cons = consumers[layer.name]
        if len(cons) == 1 and _kind(cons[0]) == "BatchNormalization":
            axis = cons[0].axis if isinstance(cons[0].axis, int) else cons[0].axis[0]
            if axis in (-1, len(layer.output.shape) - 1):
                out[layer.name] = cons[0].name
    return out


# ------------------------------------------------------------------------------------------------ rebuild


def _bn_scale_shift(bn: Any) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) with bn(x) = x * scale + shift."""
    w = {v.path.split("/")[-1]: np.asarray(v.numpy(), np.float64) for v in bn.weights}
    n = w["moving_mean"].shape[0]
    gamma = w.get("gamma", np.ones(n))
    beta = w.get("beta", np.zeros(n))
    scale = gamma / np.sqrt(w["moving_variance"] + bn.epsilon)
    return scale, beta - w["moving_mean"] * scale


def _kernel_out_view(kernel: np.ndarray, kind: str) -> np.ndarray:
    """The kernel as (..., output channels): a depthwise kernel (kh, kw, C, m) has C * m output channels."""
    return kernel.reshape(*kernel.shape[:2], -1) if kind == "DepthwiseConv2D" else kernel


def _clone(layer: Any, config_changes: dict[str, Any]) -> Any:
    cfg = {**layer.get_config(), **config_changes}
    return type(layer).from_config(cfg)


def rebuild(model: Any, fold: dict[str, str], relu_instead_of_relu6: Iterable[str] = ()) -> Any:
    """An independent copy of a functional model: ``fold`` batch norms folded into the layers before them,
    the ReLU6 layers named in ``relu_instead_of_relu6`` made ReLU; every other layer cloned with its weights."""
    keras = lazy_import("keras")
    tree = lazy_import("keras.tree", "keras")
    relu = set(relu_instead_of_relu6)
    folded_bns = {bn: conv for conv, bn in fold.items()}
    new: dict[int, Any] = {}
    inputs = []
    for t in model.inputs:
        x = keras.Input(shape=t.shape[1:], dtype=t.dtype, name=t._keras_history.operation.name)
        new[id(t)] = x
        inputs.append(x)
    for layer in model.layers:
        if _kind(layer) == "InputLayer":
            continue
        nodes = getattr(layer, "_inbound_nodes", [])
        node = next((n for n in nodes if all(id(t) in new for t in n.input_tensors)), None)
        if node is None:
            raise ConfigError(f"cannot rebuild layer '{layer.name}': not a plain functional graph")
        if layer.name in folded_bns:
            new[id(node.output_tensors[0])] = new[id(node.input_tensors[0])]
            continue
        weights = [np.asarray(w) for w in layer.get_weights()]
        changes: dict[str, Any] = {}
        if layer.name in fold:
            scale, shift = _bn_scale_shift(model.get_layer(fold[layer.name]))
            kernel = weights[0].astype(np.float64)
            view = _kernel_out_view(kernel, _kind(layer))
            bias = weights[1].astype(np.float64) if len(weights) > 1 else np.zeros(view.shape[-1])
            weights = [
                (view * scale).reshape(kernel.shape).astype(np.float32),
                (bias * scale + shift).astype(np.float32),
            ]
            changes["use_bias"] = True
        if layer.name in relu:
            changes["max_value"] = None
        clone = _clone(layer, changes)
        args = tree.map_structure(lambda a: new[id(a)] if id(a) in new else a, node.arguments.args)
        kwargs = tree.map_structure(lambda a: new[id(a)] if id(a) in new else a, node.arguments.kwargs)
        outputs = clone(*args, **kwargs)
        if weights:
            clone.set_weights(weights)
        for old, out in zip(node.output_tensors, tree.flatten(outputs)):
            new[id(old)] = out
    outputs = [new[id(t)] for t in model.outputs]
    return keras.Model(inputs, outputs[0] if len(outputs) == 1 else outputs, name=model.name)


def fold_batch_norms(model: Any) -> tuple[Any, list[str]]:
    """An equivalent model with batch norms folded into the convolution / dense layer before them."""
    fold = _foldable(model)
    return rebuild(model, fold), sorted(fold.values())


# ------------------------------------------------------------------------------------------- equalization


@dataclass(frozen=True)
class _Pair:
    first: str
    second: str
    through: tuple[str, ...]  # the layers between them
    relu6: str | None  # a ReLU6 among them (made ReLU when equalizing with relu6="relu")


def equalization_pairs(model: Any) -> list[_Pair]:
    """Consecutive weighted layers joined by a chain of single-consumer ReLU / ReLU6 / link layers."""
    consumers = _consumers(model)
    pairs = []
    for layer in model.layers:
        if _kind(layer) not in WEIGHTED or _activation(layer) not in ("linear", "relu", "relu6"):
            continue
        if _kind(layer) == "Conv2D" and layer.get_config().get("groups", 1) != 1:
            continue
        chain: list[Any] = []
        relu6 = layer.name if _activation(layer) == "relu6" else None
        cur = layer
        while True:
            cons = consumers[cur.name]
            if len(cons) != 1:
                break
            nxt = cons[0]
            if _kind(nxt) in WEIGHTED:
                if not (_kind(nxt) == "Conv2D" and nxt.get_config().get("groups", 1) != 1):
                    pairs.append(_Pair(layer.name, nxt.name, tuple(c.name for c in chain), relu6))
                break
            act = _activation(nxt) if _kind(nxt) in ("ReLU", "Activation") else None
            if act in ("relu", "relu6", "linear") or _kind(nxt) in LINK_LAYERS:
                if act == "relu6":
                    if relu6 is not None:
                        break
                    relu6 = nxt.name
                chain.append(nxt)
                cur = nxt
                continue
            break
    return pairs


def _out_range(layer: Any) -> np.ndarray:
    k = _kernel_out_view(np.asarray(layer.get_weights()[0]), _kind(layer))
    return np.abs(k.reshape(-1, k.shape[-1])).max(axis=0)


def _in_range(layer: Any) -> np.ndarray:
    k = np.asarray(layer.get_weights()[0])
    if _kind(layer) == "Dense":
        return np.abs(k).max(axis=1)
    return np.abs(np.moveaxis(k, 2, 0).reshape(k.shape[2], -1)).max(axis=1)  # (kh, kw, cin, *) -> per cin


def _scale_pair(first: Any, second: Any, s: np.ndarray) -> None:
    """Divide W1's output channels (and bias) by s, multiply W2's input channels by s."""
    w1 = [np.asarray(w) for w in first.get_weights()]
    view = _kernel_out_view(w1[0], _kind(first))
    w1[0] = (view / s).reshape(w1[0].shape).astype(np.float32)
    if len(w1) > 1:
        w1[1] = (w1[1] / s).astype(np.float32)
    first.set_weights(w1)
    w2 = [np.asarray(w) for w in second.get_weights()]
    k = w2[0]
    if _kind(second) == "Dense":
        w2[0] = (k * s[:, None]).astype(np.float32)
    else:
        shape = [1] * k.ndim
        shape[2] = -1
        w2[0] = (k * s.reshape(shape)).astype(np.float32)
    second.set_weights(w2)


def _ratio(r1: np.ndarray, r2: np.ndarray) -> float:
    ok = (r1 > 0) & (r2 > 0)
    if not ok.any():
        return 1.0
    return float(np.exp(np.mean(np.abs(np.log(r1[ok] / r2[ok])))))


RELU6 = 6.0
# relu6 mode -> (headroom h: a channel below the clip may be scaled up until h x its calibration maximum reaches
# 6; whether it may be scaled down, which moves its clip above 6 for values the calibration images never had).
RELU6_BOUNDS = {"keep": (2.0, False), "calibration": (1.0, True)}


def relu6_maxima(model: Any, pairs: list[_Pair], batches: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """Per channel, the largest ReLU6 output of each ReLU6 link over the calibration images (keyed by the link's
    first layer). A channel whose maximum stays below 6 never reached the clip on these images."""
    keras = lazy_import("keras")
    links = [p for p in pairs if p.relu6]
    if not links:
        return {}
    probe = keras.Model(model.inputs, [model.get_layer(p.relu6).output for p in links])
    out: dict[str, np.ndarray] = {}
    for x in batches:
        ys = probe([np.asarray(x, np.float32)], training=False)
        ys = ys if isinstance(ys, (list, tuple)) else [ys]
        for p, y in zip(links, ys):
            y = np.asarray(y)
            m = y.reshape(-1, y.shape[-1]).max(axis=0).astype(np.float64)
            out[p.first] = m if p.first not in out else np.maximum(out[p.first], m)
    return out


def equalize(
    model: Any,
    pairs: list[_Pair],
    maxima: dict[str, np.ndarray] | None = None,
    relu6: str = "keep",
    max_iterations: int = 50,
    tolerance: float = 1e-4,
) -> tuple[int, float, float, int]:
    """Equalize the pairs in place (batch norms already folded) until no scale moves by more than
    ``tolerance`` (relative).

    Through a ReLU6 link (``maxima`` gives its per-channel maxima m over the calibration images) each s is the
    published sqrt(r1 / r2) moved into the interval where the clip stays exact: a channel that reached 6 keeps
    s = 1, one that stayed at 0 is not scaled up (s >= 1); any other may be scaled up until h x m reaches 6
    (s >= h m / 6), and down only in ``calibration`` mode (h = 2 in ``keep`` mode, 1 in ``calibration``: see
    :data:`RELU6_BOUNDS`).

    Returns:
        (iterations, range ratio before, after, channels held at s = 1 because they reach the clip).
    """
    layers = {p.first: model.get_layer(p.first) for p in pairs} | {p.second: model.get_layer(p.second) for p in pairs}
    maxima = {k: v.copy() for k, v in (maxima or {}).items()}
    held = sum(int((m >= RELU6).sum()) for m in maxima.values())

    def ratio() -> float:
        if not pairs:
            return 1.0
        return float(np.mean([_ratio(_out_range(layers[p.first]), _in_range(layers[p.second])) for p in pairs]))

    before = ratio()
    it = 0
    for it in range(1, max_iterations + 1):
        worst = 0.0
        for p in pairs:
            first, second = layers[p.first], layers[p.second]
            r1, r2 = _out_range(first), _in_range(second)
            if r1.shape != r2.shape:
                continue
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1, dtype=np.float64)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            if p.relu6:
                m = maxima[p.first]
                clipped = m >= RELU6
                headroom, scale_down = RELU6_BOUNDS.get(relu6, RELU6_BOUNDS["keep"])
                floor = np.where(m > 0, np.minimum(1.0, m * headroom / RELU6), 1.0)
                s = np.where(clipped, 1.0, np.maximum(s, floor))
                if not scale_down:
                    s = np.where(m > 0, np.minimum(s, 1.0), s)
                maxima[p.first] = np.where(clipped, m, m / s)
            worst = max(worst, float(np.max(np.abs(np.log(s)))))
            _scale_pair(first, second, s)
        if worst < tolerance:
            break
    return it, before, ratio(), held


# ---------------------------------------------------------------------------------------- bias correction


def per_channel_int8(kernel: np.ndarray, depthwise: bool) -> np.ndarray:
    """Symmetric int8 per output channel (max |w| -> 127), dequantized: what TFLite, the Q/DQ model and
    TensorRT do with weights."""
    view = kernel.reshape(*kernel.shape[:2], -1) if depthwise else kernel
    flat = view.reshape(-1, view.shape[-1])
    amax = np.abs(flat).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    return (np.clip(np.round(view / scale), -127, 127) * scale).reshape(kernel.shape).astype(np.float32)


def input_means(model: Any, layers: list[str], batches: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-input-channel mean of each named layer's input over the batches (one pass, the float model)."""
    keras = lazy_import("keras")
    tensors = []
    for name in layers:
        node = model.get_layer(name)._inbound_nodes[0]
        tensors.append(node.input_tensors[0])
    probe = keras.Model(model.inputs, tensors)
    sums = [None] * len(layers)
    count = 0
    for x in batches:
        outs = probe([np.asarray(x, np.float32)], training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for k, o in enumerate(outs):
            o = np.asarray(o, np.float64)
            s = o.reshape(-1, o.shape[-1]).mean(axis=0) * o.shape[0]  # per image: the mean over positions
            sums[k] = s if sums[k] is None else sums[k] + s
        count += int(np.asarray(x).shape[0])
    if count == 0:
        raise ConfigError("bias correction needs calibration images")
    return {name: sums[k] / count for k, name in enumerate(layers)}


WeightQuantizer = Callable[[np.ndarray, bool], np.ndarray]


def bias_correction(
    model: Any, means: dict[str, np.ndarray], quantize: WeightQuantizer = per_channel_int8
) -> dict[str, np.ndarray]:
    """The bias change of each layer: -E[(W_q - W) x] from its input's per-channel mean."""
    out = {}
    for name, mean in means.items():
        layer = model.get_layer(name)
        k = np.asarray(layer.get_weights()[0], np.float64)
        err = quantize(k.astype(np.float32), _kind(layer) == "DepthwiseConv2D").astype(np.float64) - k
        if _kind(layer) == "Dense":
            shift = mean @ err
        elif _kind(layer) == "DepthwiseConv2D":
            shift = (err.sum(axis=(0, 1)) * mean[:, None]).reshape(-1)
        else:
            shift = np.einsum("hwio,i->o", err, mean)
        out[name] = -shift
    return out


def biased_layers(model: Any) -> list[str]:
    return [
        layer.name
        for layer in model.layers
        if _kind(layer) in WEIGHTED and getattr(layer, "use_bias", False) and len(layer.get_weights()) > 1
    ]


def apply_bias_correction(model: Any, corrections: dict[str, np.ndarray]) -> None:
    for name, delta in corrections.items():
        layer = model.get_layer(name)
        w = layer.get_weights()
        w[1] = (np.asarray(w[1], np.float64) + delta).astype(np.float32)
        layer.set_weights(w)


# ---------------------------------------------------------------------------------------------- together


def _checked_shapes(model: Any, batches: Iterable[np.ndarray]) -> list[np.ndarray]:
    """The calibration batches, each checked against the model's input shape (a ``--preprocess size`` the model
    does not take fails this target with a message, as it fails the targets without post-training steps).

    Raises:
        ConversionError: Naming both shapes.
    """
    expected = tuple(model.inputs[0].shape[1:])
    out = list(batches)
    for x in out:
        got = tuple(np.asarray(x).shape[1:])
        if len(got) != len(expected) or any(e is not None and e != g for e, g in zip(expected, got)):
            raise ConversionError(
                f"the calibration images are {got}, the model takes {expected}: --preprocess (size, layout) does "
                "not fit the model"
            )
    return out


def prepare_model(
    model: Any,
    steps: PtqSteps,
    batches: Callable[[], Iterable[np.ndarray]] | None = None,
    adaround_store: Any = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Any, PtqReport]:
    """A new Keras model with the steps applied (the original is left as it is: it stays the fp32 reference):
    batch norms folded, equalization, AdaRound, bias correction, in that order (after AdaRound the rounded
    weights are on the int8 grid, so bias correction finds nothing left to correct in them).

    Args:
        adaround_store: Where AdaRound's integers are kept for this build key
            (:class:`quantship.convert.adaround.AdaRoundStore`; None: computed every time).
        progress: Called with each layer's name as AdaRound starts it.

    Raises:
        ConfigError: Bias correction or AdaRound without calibration batches, or a model that is not a plain
            functional graph.
    """
    if steps.auto:
        raise ConfigError("post-training auto is a search over steps, not steps to apply: choose a candidate first")
    report = PtqReport(steps)
    if not steps.active:
        return model, report
    if batches is not None:
        _batches = batches
        batches = lambda: _checked_shapes(model, _batches())  # noqa: E731 - the same callable, checked
    fold = _foldable(model)
    report.folded = sorted(fold.values())
    relu6_to_relu: list[str] = []
    if steps.equalize and steps.relu6 == "relu":
        # Pairs are found on the folded structure; find them on a folded copy first to know which ReLU6 to change.
        probe = rebuild(model, fold)
        relu6_to_relu = sorted({p.relu6 for p in equalization_pairs(probe) if p.relu6})
        relu6_to_relu = [n for n in relu6_to_relu if _kind(probe.get_layer(n)) == "ReLU"]
    prepared = rebuild(model, fold, relu6_to_relu)
    report.relu6_replaced = relu6_to_relu
    if steps.equalize:
        pairs = equalization_pairs(prepared)
        if batches is None:  # without calibration images nothing is known about the clip: ReLU and linear only
            pairs = [p for p in pairs if p.relu6 is None]
        maxima = relu6_maxima(prepared, pairs, batches()) if batches is not None else {}
        report.pairs = [(p.first, p.second) for p in pairs]
        report.relu6_pairs = sum(1 for p in pairs if p.relu6)
        it, before, after, held = equalize(prepared, pairs, maxima, steps.relu6)
        report.iterations, report.range_ratio_before, report.range_ratio_after = it, before, after
        report.relu6_channels_at_clip = held
    if steps.adaround is not None:
        if batches is None:
            raise ConfigError("adaround needs calibration images")

        options = steps.adaround
        images = lambda: _first_images(batches(), options.images)  # noqa: E731
        report.adaround = adaround_cached(prepared, images, options, adaround_store, progress)
    if steps.bias_correct:
        if batches is None:
            raise ConfigError("bias correction needs calibration images")
        layers = biased_layers(prepared)
        corrections = bias_correction(prepared, input_means(prepared, layers, batches()))
        apply_bias_correction(prepared, corrections)
        report.corrected = layers
        if corrections:
            report.mean_abs_correction = float(np.mean([np.abs(d).mean() for d in corrections.values()]))
    return prepared, report


def _first_images(batches: Iterable[np.ndarray], count: int) -> np.ndarray:
    out, n = [], 0
    for b in batches:
        b = np.asarray(b, np.float32)
        out.append(b[: count - n])
        n += len(out[-1])
        if n >= count:
            break
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def max_abs_difference(a: Any, b: Any, x: np.ndarray) -> float:
    """Largest |difference| of two models' outputs on ``x`` (how exact a rewrite is)."""
    ya = np.asarray(a([x], training=False), np.float64)
    yb = np.asarray(b([x], training=False), np.float64)
    d = float(np.max(np.abs(ya - yb)))
    return d if math.isfinite(d) else math.inf
