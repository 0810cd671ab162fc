"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020): learn,
per weight, whether to round its int8 value down or up so that each layer's output on calibration images stays
as close as possible to the float layer's, instead of rounding every weight to the nearest grid point.

The grid is the one every backend then uses: symmetric int8 per output channel, scale s = max |w| / 127 over the
channel (TFLite, the Q/DQ model, ONNX Runtime int8 and TensorRT all compute it so from the kernel). The rounded
weights are written back into the Keras model as s * q, with the channel's largest weight kept at +-127, so a
backend that quantizes them again finds the same scale and exactly the integers q: nothing else in the pipeline
changes (:func:`quantship.convert.ptq.prepare_model` applies it after folding and equalization).

Loss and schedule as in the paper and AIMET's implementation (``aimet_tensorflow/adaround/adaround_loss.py``):

* rounding variable V per weight, h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), zeta = 1.1,
  gamma = -0.1, initialised so that h(V) equals the weight's fractional part (the soft weight starts equal to
  the float weight); soft weight s * clip(floor(w / s) + h(V), -127, 127);
* reconstruction loss: squared difference summed over output channels, averaged over images and positions, of
  the layer's output (bias and its activation included, and a ReLU / ReLU6 layer that is its only consumer:
  values the activation discards cost nothing);
* rounding regulariser lambda * sum(1 - |2 h(V) - 1| ^ beta), lambda = 0.01, off for the first 20 % of the
  steps, then beta annealed from 20 to 2 by a cosine; Adam (learning rate: see
  :attr:`quantship.config.AdaRoundOptions.learning_rate`); finally q = floor + (h >= 0.5).

Inputs, as AIMET samples them: the soft layer reads its input from the quantized model, in which every earlier
layer already has its AdaRound weights and every activation an int8 backend quantizes is fake-quantized (8-bit,
asymmetric, per tensor, on the range min..max of the float model's values on the AdaRound images: the max
calibrator's range; the calibrator a target uses later may clip more), and is compared with the float layer on the
float model's input. So each layer also corrects the error its predecessors' rounding and the quantization of its
input left (the paper's "asymmetric" reconstruction). With float activations in that stream (the first version),
AdaRound cut each layer's own output error by 38 % on MobileNetV2 but moved nothing at the output (int8_fidelity
section of benchmarks/README.md).

The budget is reduced from the paper's 10000 steps on 1024 images (:class:`quantship.config.AdaRoundOptions`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from quantship.config import AdaRoundOptions
from quantship.errors import ConfigError
from quantship.fileio import write_bytes_atomic
from quantship.lazy import lazy_import
from quantship.progress import note

ZETA, GAMMA = 1.1, -0.1
REG_PARAM = 0.01
BETA_RANGE = (20.0, 2.0)
WARM_START = 0.2
INT8_MAX = 127
ROUNDED = ("Conv2D", "DepthwiseConv2D", "Dense")
SEED = 0
# Layers whose output an int8 backend does not quantize again: reshapes keep their input's grid, and a layer's
# output that only a ReLU / ReLU6 reads is fused with it (only the activation's output is quantized).
PASS_THROUGH = ("InputLayer", "Reshape", "Flatten", "Dropout")
ACTIVATION_LEVELS = 256
# Whether the rounded model's activations are fake-quantized (see the module docstring); a module switch so the
# benchmark can measure the float-activation variant beside it.
QUANTIZE_ACTIVATIONS = True


@dataclass
class AdaRoundReport:
    """What AdaRound did (recorded in manifests under ``post_training``)."""

    options: AdaRoundOptions
    layers: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # weighted layers left to nearest rounding, and why
    images: int = 0
    flipped: float = 0.0  # fraction of weights rounded the other way than to the nearest grid point
    error_nearest: float = 0.0  # mean over layers of the output error relative to the output's energy
    error_adaround: float = 0.0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # the process's CPU time, all threads: what a quiet machine needs, whatever the load
    cached: bool = False
    # per layer: (name, seconds computing its inputs and targets, seconds optimising); not in to_dict: timings
    # differ between runs and the dict goes into build keys
    timings: list[tuple[str, float, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        # Figures only: this dict goes into build keys, so it must not change between a run and its reuse.
        return {
            "adaround_layers": len(self.layers),
            "adaround_skipped": self.skipped,
            "adaround_images": self.images,
            "adaround_flipped_fraction": round(self.flipped, 6),
            "adaround_relative_error_nearest": round(self.error_nearest, 6),
            "adaround_relative_error": round(self.error_adaround, 6),
        }


# --------------------------------------------------------------------------------------------- the grid


def _out_channels_view(kernel: np.ndarray, kind: str) -> np.ndarray:
    """The kernel as (..., output channels): a depthwise kernel (kh, kw, C, m) has C * m output channels."""
    return kernel.reshape(*kernel.shape[:2], -1) if kind == "DepthwiseConv2D" else kernel


def channel_scale(kernel: np.ndarray, kind: str) -> np.ndarray:
    """Per-output-channel scale max |w| / 127, shaped to broadcast against ``kernel`` (1 for an all-zero channel)."""
    view = _out_channels_view(np.asarray(kernel, np.float32), kind)
    amax = np.abs(view.reshape(-1, view.shape[-1])).max(axis=0)
    scale = np.where(amax > 0, amax / np.float32(INT8_MAX), np.float32(1.0)).astype(np.float32)
    if kind == "DepthwiseConv2D":
        return scale.reshape(1, 1, *kernel.shape[2:])
    return scale.reshape((1,) * (kernel.ndim - 1) + (-1,))


def nearest_integers(kernel: np.ndarray, kind: str) -> np.ndarray:
    """Round-to-nearest int8 (what every backend does without AdaRound)."""
    return np.clip(np.round(kernel / channel_scale(kernel, kind)), -INT8_MAX, INT8_MAX).astype(np.int8)


def _keep_channel_maxima(q: np.ndarray, kernel: np.ndarray, kind: str) -> np.ndarray:
    """Each channel's largest |w| stays at +-127, so the scale a backend recomputes from s * q is s again."""
    flat_k = _out_channels_view(kernel, kind)
    shape = flat_k.shape
    flat_k = flat_k.reshape(-1, shape[-1])
    flat_q = _out_channels_view(q, kind).reshape(-1, shape[-1]).copy()
    top = np.abs(flat_k).argmax(axis=0)
    cols = np.arange(shape[-1])
    nonzero = np.abs(flat_k[top, cols]) > 0
    flat_q[top[nonzero], cols[nonzero]] = np.sign(flat_k[top[nonzero], cols[nonzero]]) * INT8_MAX
    return flat_q.reshape(q.shape)


def dequantized(q: np.ndarray, kernel: np.ndarray, kind: str) -> np.ndarray:
    """s * q with s the grid of ``kernel`` (the float weights written back into the model)."""
    return (q.astype(np.float32) * channel_scale(kernel, kind)).astype(np.float32)


# ------------------------------------------------------------------------------------------- the layers


def _kind(layer: Any) -> str:
    return type(layer).__name__


def eligible(layer: Any) -> str | None:
    """Why a weighted layer is left to nearest rounding (None: AdaRound handles it)."""
    kind = _kind(layer)
    if kind not in ROUNDED:
        return "not a convolution or dense layer"
    cfg = layer.get_config()
    if cfg.get("data_format", "channels_last") != "channels_last":
        return "channels_first"
    if kind == "Conv2D" and cfg.get("groups", 1) != 1:
        return "grouped convolution"
    return None


def _following_relu(model: Any, layer: Any) -> Any | None:
    """The ReLU / ReLU6 layer that is ``layer``'s only consumer (its output is what the next layers read)."""
    consumers = [
        other
        for other in model.layers
        for node in getattr(other, "_inbound_nodes", [])[:1]
        if any(p.operation is layer for p in node.parent_nodes)
    ]
    if len(consumers) != 1:
        return None
    nxt = consumers[0]
    if _kind(nxt) == "ReLU":
        cfg = nxt.get_config()
        return nxt if not cfg.get("negative_slope") and not cfg.get("threshold") else None
    if _kind(nxt) == "Activation" and cfg_activation(nxt) in ("relu", "relu6"):
        return nxt
    return None


def cfg_activation(layer: Any) -> str | None:
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", None) if act is not None else None


def _layer_fn(layer: Any, after: Any | None, patches: bool = False) -> Callable[[Any, Any], Any]:
    """f(x, kernel): the layer's output (bias, own activation and ``after`` included) with a given kernel. With
    ``patches``, x holds input patches of the kernel's extent (see :func:`_patches`): the convolution runs
    without padding and at stride 1, one output position per patch."""
    tf = lazy_import("tensorflow")
    kind = _kind(layer)
    cfg = layer.get_config()
    weights = layer.get_weights()
    bias = tf.constant(np.asarray(weights[1], np.float32)) if len(weights) > 1 else None
    activation = _tf_activation(getattr(layer, "activation", None))
    after_fn = _tf_activation(after.activation) if after is not None and _kind(after) == "Activation" else None
    if after is not None and _kind(after) == "ReLU":
        cap = after.get_config().get("max_value")
        after_fn = (lambda y: tf.nn.relu(y)) if cap is None else (lambda y: tf.clip_by_value(y, 0.0, float(cap)))
    if kind in ("Conv2D", "DepthwiseConv2D"):
        dilations = list(cfg["dilation_rate"])
        strides = [1, 1] if patches else list(cfg["strides"])
        padding = "VALID" if patches else cfg["padding"].upper()
        if kind == "Conv2D":

            def op(x: Any, k: Any) -> Any:
                return tf.nn.conv2d(x, k, strides=strides, padding=padding, dilations=dilations)

        else:

            def op(x: Any, k: Any) -> Any:
                return tf.nn.depthwise_conv2d(x, k, strides=[1, *strides, 1], padding=padding, dilations=dilations)

    else:

        def op(x: Any, k: Any) -> Any:
            return tf.tensordot(x, k, [[len(x.shape) - 1], [0]])

    def fn(x: Any, k: Any) -> Any:
        y = op(x, k)
        if bias is not None:
            y = y + bias
        if activation is not None:
            y = activation(y)
        return after_fn(y) if after_fn is not None else y

    return fn


def _tf_activation(act: Any) -> Callable[[Any], Any] | None:
    """The activation as TensorFlow ops (ReLU / ReLU6 / linear directly; any other through Keras)."""
    tf = lazy_import("tensorflow")
    name = getattr(act, "__name__", None) if act is not None else "linear"
    if name == "linear":
        return None
    if name == "relu":
        return tf.nn.relu
    if name == "relu6":
        return tf.nn.relu6
    return act


class _Sampler:
    """Random output positions of a layer over the images, with the input patch each one reads: a step of the
    optimisation costs as many positions as it samples, whatever the feature map's size (the loss is a mean over
    images and positions, so a uniform sample of positions estimates it without bias). Sampling runs inside the
    TensorFlow graph, so a step copies nothing between numpy and TensorFlow."""

    def __init__(self, layer: Any, x: np.ndarray, target: np.ndarray):
        tf = lazy_import("tensorflow")
        self.conv = _kind(layer) in ("Conv2D", "DepthwiseConv2D")
        self.target = tf.constant(target.reshape(-1, target.shape[-1]))
        self.positions = int(np.prod(target.shape[:-1]))
        if not self.conv:
            self.x = tf.constant(x.reshape(-1, x.shape[-1]))
            return
        cfg = layer.get_config()
        kh, kw = cfg["kernel_size"]
        (sh, sw), (dh, dw) = cfg["strides"], cfg["dilation_rate"]
        eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
        _, h, w, _ = x.shape
        _, oh, ow, _ = target.shape
        pads = []
        for size, out, stride, extent in ((h, oh, sh, eh), (w, ow, sw, ew)):
            total = max((out - 1) * stride + extent - size, 0) if cfg["padding"] == "same" else 0
            pads.append((total // 2, total - total // 2))
        self.x = tf.constant(np.pad(x, ((0, 0), *pads, (0, 0))))
        self.oh, self.ow = oh, ow
        self.stride, self.extent = (sh, sw), (eh, ew)

    def take(self, index: Any) -> tuple[Any, Any]:
        """(inputs, targets) of the positions ``index`` (flat over images and output positions), in the graph."""
        tf = lazy_import("tensorflow")
        y = tf.gather(self.target, index)
        if not self.conv:
            return tf.gather(self.x, index), y
        b = index // (self.oh * self.ow)
        i = (index // self.ow) % self.oh
        j = index % self.ow
        p = tf.shape(index)[0]
        eh, ew = self.extent
        rows = i[:, None] * self.stride[0] + tf.range(eh)[None, :]
        cols = j[:, None] * self.stride[1] + tf.range(ew)[None, :]
        grid = tf.stack(
            [
                tf.broadcast_to(b[:, None, None], [p, eh, ew]),
                tf.broadcast_to(rows[:, :, None], [p, eh, ew]),
                tf.broadcast_to(cols[:, None, :], [p, eh, ew]),
            ],
            axis=-1,
        )
        return tf.gather_nd(self.x, grid), tf.reshape(y, [p, 1, 1, -1])


def _batched(fn: Callable, x: np.ndarray, kernel: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i : i + batch], kernel), np.float32) for i in range(0, len(x), batch)])


def _relative_error(fn: Callable, x_hat: np.ndarray, target: np.ndarray, kernel: np.ndarray) -> float:
    y = _batched(fn, x_hat, kernel).astype(np.float64)
    energy = float(np.sum(np.square(target.astype(np.float64))))
    return float(np.sum(np.square(y - target))) / energy if energy > 0 else 0.0


def activation_grid(values: np.ndarray) -> tuple[float, float]:
    """(scale, zero point) of an 8-bit asymmetric per-tensor grid covering min..max of ``values`` and 0."""
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    scale = (hi - lo) / (ACTIVATION_LEVELS - 1) if hi > lo else 1.0
    return scale, round(-lo / scale)


def fake_quant(values: np.ndarray, grid: tuple[float, float]) -> np.ndarray:
    """``values`` rounded to the 8-bit ``grid`` (clipped to its 256 levels) and back to float."""
    scale, zero = grid
    q = np.clip(np.round(values / scale) + zero, 0, ACTIVATION_LEVELS - 1)
    return ((q - zero) * scale).astype(np.float32)


def _quantized_output(model: Any, layer: Any) -> bool:
    """Whether an int8 backend quantizes ``layer``'s output (see :data:`PASS_THROUGH`)."""
    if _kind(layer) in PASS_THROUGH:
        return False
    return _following_relu(model, layer) is None


def round_layer(
    layer: Any,
    after: Any | None,
    kernel: np.ndarray,
    x_hat: np.ndarray,
    target: np.ndarray,
    options: AdaRoundOptions,
    seed: int = SEED,
) -> np.ndarray:
    """The int8 kernel of one layer minimising the reconstruction of ``target`` from ``x_hat``."""
    tf = lazy_import("tensorflow")
    kind = _kind(layer)
    fn = _layer_fn(layer, after, patches=True)
    sampler = _Sampler(layer, x_hat, target)
    scale = channel_scale(kernel, kind)
    w = kernel.astype(np.float32) / scale
    floor = np.floor(w)
    rest = np.clip(w - floor, 1e-6, 1 - 1e-6)
    v = tf.Variable(-np.log((ZETA - GAMMA) / (rest - GAMMA) - 1).astype(np.float32))
    floor_t, scale_t = tf.constant(floor, tf.float32), tf.constant(scale, tf.float32)
    m1, m2 = tf.Variable(tf.zeros_like(v)), tf.Variable(tf.zeros_like(v))  # Adam's moments
    lr, b1, b2, eps = options.learning_rate, 0.9, 0.999, 1e-7

    n = sampler.positions
    size = min(options.positions, n)
    iterations = options.iterations
    warm = int(WARM_START * iterations)
    start_beta, end_beta = BETA_RANGE

    def step(it: Any) -> Any:
        if size < n:
            index = tf.random.stateless_uniform([size], seed=tf.stack([seed, it]), maxval=n, dtype=tf.int32)
        else:
            index = tf.range(n)
        xb, yb = sampler.take(index)
        rel = tf.cast(it - warm, tf.float32) / float(max(iterations - warm, 1))
        # AIMET's cosine decay of beta from 20 to 2 over the steps after the warm start
        beta = end_beta + 0.5 * (start_beta - end_beta) * (1.0 + tf.cos(rel * math.pi))
        reg_on = tf.cast(it >= warm, tf.float32)
        with tf.GradientTape() as tape:
            h = tf.clip_by_value(tf.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
            soft = scale_t * tf.clip_by_value(floor_t + h, -INT8_MAX, INT8_MAX)
            y = fn(xb, soft)
            recon = tf.reduce_mean(tf.reduce_sum(tf.square(y - yb), axis=-1))
            reg = REG_PARAM * tf.reduce_sum(1.0 - tf.pow(tf.abs(2.0 * h - 1.0), beta))
            loss = recon + reg_on * reg
        g = tape.gradient(loss, v)
        t = tf.cast(it + 1, tf.float32)
        m1.assign(b1 * m1 + (1 - b1) * g)
        m2.assign(b2 * m2 + (1 - b2) * tf.square(g))
        v.assign_sub(lr * (m1 / (1 - b1**t)) / (tf.sqrt(m2 / (1 - b2**t)) + eps))
        return it + 1

    # The whole optimisation in one graph (no Python or numpy work per step); autograph off: tracing is then
    # a fraction of a second per layer.
    fit = tf.function(lambda: tf.while_loop(lambda it: it < iterations, step, [tf.constant(0)]), autograph=False)
    fit()
    hard = (v.numpy() >= 0).astype(np.float32)
    q = np.clip(floor + hard, -INT8_MAX, INT8_MAX)
    return _keep_channel_maxima(q, kernel, kind).astype(np.int8)


def adaround(
    model: Any,
    images: np.ndarray,
    options: AdaRoundOptions = AdaRoundOptions(),
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, np.ndarray], AdaRoundReport]:
    """Round every eligible layer of ``model`` (batch norms already folded) in place, in graph order.

    Args:
        model: A functional Keras model; its weighted layers get the weights s * q.
        images: Calibration inputs (the first ``options.images`` are used).
        options: The budget.
        progress: Called with each layer's name as it starts.

    Returns:
        (int8 kernel per rounded layer, report).

    Raises:
        ConfigError: No calibration image.
    """
    images = np.asarray(images, np.float32)[: options.images]
    if len(images) == 0:
        raise ConfigError("adaround needs calibration images")
    if len(model.inputs) != 1:
        raise ConfigError("adaround handles models with one input")
    started, cpu_started = time.perf_counter(), time.process_time()
    report = AdaRoundReport(options, images=len(images))
    integers: dict[str, np.ndarray] = {}
    flipped, total, err_near, err_ada = 0, 0, [], []
    # Two streams of activations through the graph, one layer at a time (each layer runs once per stream, however
    # deep the model): the float model's, and the model's with every layer so far rounded.
    floats: dict[int, np.ndarray] = {id(model.inputs[0]): images}
    quantize = QUANTIZE_ACTIVATIONS
    hats: dict[int, np.ndarray] = {
        id(model.inputs[0]): fake_quant(images, activation_grid(images)) if quantize else images
    }
    layers = [layer for layer in model.layers if _kind(layer) != "InputLayer"]
    readers = Counter(id(t) for layer in layers for t in _node(layer).input_tensors)
    for layer in layers:
        node = _node(layer)
        t0 = time.perf_counter()
        y_float = _call(layer, node, floats)
        why = eligible(layer) if _kind(layer) in ROUNDED else "-"
        if why is not None:
            if why != "-":
                report.skipped.append(f"{layer.name}: {why}")
            y_hat = _call(layer, node, hats)
        else:
            if progress is not None:
                progress(layer.name)
            kind = _kind(layer)
            after = _following_relu(model, layer)
            weights = layer.get_weights()
            kernel = np.asarray(weights[0], np.float32)
            fn = _layer_fn(layer, after)
            x_hat = hats[id(node.input_tensors[0])]
            target = _batched(fn, floats[id(node.input_tensors[0])], kernel)
            t1 = time.perf_counter()
            q = round_layer(layer, after, kernel, x_hat, target, options, seed=len(report.layers))
            t2 = time.perf_counter()
            near = nearest_integers(kernel, kind)
            flipped += int(np.count_nonzero(q != near))
            total += q.size
            err_near.append(_relative_error(fn, x_hat, target, dequantized(near, kernel, kind)))
            err_ada.append(_relative_error(fn, x_hat, target, dequantized(q, kernel, kind)))
            layer.set_weights([dequantized(q, kernel, kind), *weights[1:]])
            integers[layer.name] = q
            report.layers.append(layer.name)
            y_hat = _call(layer, node, hats)
            report.timings.append((layer.name, (t1 - t0) + (time.perf_counter() - t2), t2 - t1))
        if quantize and _quantized_output(model, layer):
            y_hat = [fake_quant(yh, activation_grid(yf)) for yf, yh in zip(y_float, y_hat)]
        for t, yf, yh in zip(node.output_tensors, y_float, y_hat):
            floats[id(t)], hats[id(t)] = yf, yh
        for t in node.input_tensors:  # drop what no later layer reads
            readers[id(t)] -= 1
            if readers[id(t)] <= 0:
                floats.pop(id(t), None)
                hats.pop(id(t), None)
    report.flipped = flipped / total if total else 0.0
    report.error_nearest = float(np.mean(err_near)) if err_near else 0.0
    report.error_adaround = float(np.mean(err_ada)) if err_ada else 0.0
    report.seconds = time.perf_counter() - started
    report.cpu_seconds = time.process_time() - cpu_started
    return integers, report


def _node(layer: Any) -> Any:
    nodes = getattr(layer, "_inbound_nodes", [])
    if len(nodes) != 1:
        raise ConfigError(
            f"adaround: layer '{layer.name}' is used {len(nodes)} times; a plain functional graph is needed"
        )
    return nodes[0]


def _call(layer: Any, node: Any, values: dict[int, np.ndarray], batch: int = 8) -> list[np.ndarray]:
    """The layer's outputs on the stored values of its inputs, a few images at a time."""
    tree = lazy_import("keras.tree", "keras")
    n = len(next(values[id(t)] for t in node.input_tensors))
    chunks = []
    for i in range(0, n, batch):
        pick = lambda a: values[id(a)][i : i + batch] if id(a) in values else a  # noqa: E731
        args = tree.map_structure(pick, node.arguments.args)
        kwargs = tree.map_structure(pick, node.arguments.kwargs)
        chunks.append([np.asarray(o, np.float32) for o in tree.flatten(layer(*args, **kwargs))])
    return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]


def apply_integers(model: Any, integers: dict[str, np.ndarray]) -> None:
    """Write stored AdaRound integers back as s * q (the grid recomputed from the model's own kernels).

    Raises:
        ConfigError: A stored kernel that does not fit the model (a cache written for another model).
    """
    for name, q in integers.items():
        layer = model.get_layer(name)
        weights = layer.get_weights()
        kernel = np.asarray(weights[0], np.float32)
        if q.shape != kernel.shape:
            raise ConfigError(f"stored adaround weights of '{name}' have shape {q.shape}, the layer {kernel.shape}")
        layer.set_weights([dequantized(q, kernel, _kind(layer)), *weights[1:]])


# ------------------------------------------------------------------------------------------------ cache

CACHE_FORMAT = 2  # bump when the rounding itself changes: stored integers of older code are then not reused


class AdaRoundStore:
    """AdaRound's integers for one build key, stored as an ``.npz`` (read without pickle) beside the artifacts, so
    a rerun with the same model, steps, calibration images and budget skips the optimisation."""

    def __init__(self, path: Any):
        self.path = Path(path)

    def load(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """(integers, report figures), or None when nothing usable is stored."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("format") != CACHE_FORMAT:
                    return None
                ints = {name: data[f"w{i}"].astype(np.int8) for i, name in enumerate(meta["layers"])}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
            return None
        return ints, meta["report"]

    def save(self, integers: dict[str, np.ndarray], report: dict[str, Any]) -> None:
        names = list(integers)
        meta = {"format": CACHE_FORMAT, "layers": names, "report": report}
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **{f"w{i}": integers[n] for i, n in enumerate(names)})
        write_bytes_atomic(self.path, buf.getvalue())


def adaround_cached(
    model: Any,
    images: Callable[[], np.ndarray],
    options: AdaRoundOptions,
    store: AdaRoundStore | None = None,
    progress: Callable[[str], None] | None = None,
) -> AdaRoundReport:
    """:func:`adaround`, or its stored integers written back when ``store`` holds them."""
    if store is not None and (hit := store.load()) is not None:
        integers, figures = hit
        apply_integers(model, integers)
        report = AdaRoundReport(options, layers=list(integers), cached=True)
        report.skipped = list(figures.get("adaround_skipped", []))
        report.images = int(figures.get("adaround_images", 0))
        report.flipped = float(figures.get("adaround_flipped_fraction", 0.0))
        report.error_nearest = float(figures.get("adaround_relative_error_nearest", 0.0))
        report.error_adaround = float(figures.get("adaround_relative_error", 0.0))
        return report
    # Each layer traces its own graph on purpose (its shapes and weights are its own): TensorFlow's warning about
    # "excessive retracing" would only be noise here.
    tf_log = logging.getLogger("tensorflow")
    level = tf_log.level
    tf_log.setLevel(max(level, logging.ERROR))
    try:
        integers, report = adaround(model, images(), options, progress)
    finally:
        tf_log.setLevel(level)
    fit = sum(t[2] for t in report.timings)
    note(
        f"AdaRound: {len(report.layers)} layers, {report.images} images, {options.iterations} steps each, "
        f"{report.seconds:.0f} s ({fit:.0f} s optimising, {report.cpu_seconds:.0f} s CPU); "
        f"{report.flipped:.1%} of weights rounded away from "
        f"nearest, layer output error {report.error_adaround:.3g} vs {report.error_nearest:.3g} (nearest)"
    )
    if store is not None:
        store.save(integers, report.to_dict())
    return report
