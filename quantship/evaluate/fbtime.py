"""Forward and backward time of a classification network, the training-side figure of the field's model tables
(``caffe time``: mean forward, mean backward, and per layer).

A forward pass is the network in training mode (batch norm on batch statistics, as ``caffe time`` runs the TRAIN
phase) plus a cross-entropy loss against random labels; a forward+backward pass is the same under a gradient
tape, with the gradient of that loss with respect to every trainable weight. Both are ``tf.function``-compiled,
warmed up, then timed in alternation (one of each per iteration, so machine noise hits both alike) for at least
``min_queries`` iterations and ``min_seconds`` seconds.

Statistics (:func:`forward_backward_stats`), robust as the project's latency figures are: forward and total are the
medians of their per-iteration times; backward is the median of the per-iteration paired differences (this
iteration's forward+backward minus this iteration's forward), with the distribution-free 95 % interval of that
median (:func:`quantship.evaluate.stability.median_interval`). Backward is reported only when it is resolved: the
interval lies above 0 and reaches its 95 % coverage (6 iterations or more). Otherwise ``backward_ms`` is None, the
row says "not resolved" and why, and the interval is kept. A negative backward time is never reported.

Why not the difference of the means (the first version, and ``caffe time``'s figure): one slow forward pass under
load moves the forward mean more than the backward time, and the difference came out at -8.6 ms at load ~20.

What holds between the three: forward_ms + backward_ms = total_ms is exact for means only. With medians it is
exact when every iteration's backward pass takes the same time, and approximate otherwise (the median of the
differences is not the difference of the medians); the means of forward and total stay in the row
(``forward_ms_mean``, ``total_ms_mean``) for comparison with ``caffe time``.

Each configuration runs in its own process (``quantship bench --forward-backward``), like the inference
benchmarks.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from quantship.config import PreprocessSpec
from quantship.errors import ConfigError
from quantship.evaluate.stability import CONFIDENCE, median_interval
from quantship.evaluate.worker import run_worker, worker_main
from quantship.lazy import lazy_import
from quantship.models.loading import is_model_file, load_model, resolve_preprocess

SLOWEST_LAYERS = 10


@dataclass(frozen=True)
class FBConfig:
    """One model's forward/backward timing.

    Attributes:
        model: Registry name or a model file (a classification network).
        weights: Weights (``random`` by default: timing does not depend on them).
        batch_sizes: One row per batch size.
        warmup_seconds: Warm-up after the compiled functions have been traced.
        min_queries, min_seconds: Timed iterations (each one forward and one forward+backward pass).
        per_layer: Also time each layer's forward pass alone and report the ten slowest.
        threads: TensorFlow intra-op threads (None: TensorFlow's default).
        preprocess: Preprocessing overrides; only the input size matters here (a ``.keras`` / ``.h5`` file
            needs none, a SavedModel folder its ``size``).
    """

    model: str
    weights: str | None = None
    batch_sizes: tuple[int, ...] = (1,)
    warmup_seconds: float = 1.0
    min_queries: int = 200
    min_seconds: float = 5.0
    per_layer: bool = False
    threads: int | None = None
    preprocess: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.min_queries <= 0 or self.min_seconds < 0 or self.warmup_seconds < 0:
            raise ConfigError("min_queries must be positive, min_seconds and warmup_seconds not negative")
        if not self.batch_sizes or min(self.batch_sizes) <= 0:
            raise ConfigError("batch sizes must be positive")


def check_classifier(model: Any, name: str) -> tuple[tuple[int, ...], int]:
    """The input shape (without batch) and class count of a single-input classifier.

    Raises:
        ConfigError: Several inputs or outputs, or an output that is not ``(batch, classes)``.
    """
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConfigError(f"{name}: forward/backward timing takes classification models (one input, one output)")
    out_shape = tuple(model.outputs[0].shape)
    if len(out_shape) != 2 or not out_shape[1]:
        raise ConfigError(f"{name}: output {out_shape} is not (batch, classes): not a classification model")
    in_shape = tuple(model.inputs[0].shape[1:])
    if any(d is None for d in in_shape):
        raise ConfigError(f"{name}: input shape {in_shape} is not fixed")
    return in_shape, int(out_shape[1])


def _sync(tf: Any) -> None:
    # A GPU runs asynchronously from the host: the clock stops when the device is done. No-op on the CPU.
    tf.test.experimental.sync_devices()


def _outputs_probabilities(model: Any, x: Any) -> bool:
    """Whether the network ends in a softmax (rows in [0, 1] summing to 1), so the loss takes probabilities."""
    y = np.asarray(model(x, training=False))
    return bool(np.all(y >= 0) and np.all(y <= 1) and np.allclose(y.sum(axis=-1), 1.0, atol=1e-3))


def forward_backward_functions(model: Any, x: Any, y: Any) -> tuple[Any, Any]:
    """Compiled ``forward(x, y) -> loss`` and ``forward_backward(x, y) -> (loss, gradients)``."""
    tf = lazy_import("tensorflow", purpose="forward/backward timing")
    keras = lazy_import("keras")
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=not _outputs_probabilities(model, x))
    weights = model.trainable_weights
    if not weights:
        raise ConfigError(f"{model.name}: no trainable weights to take a gradient for")

    @tf.function
    def forward(x, y):
        return loss_fn(y, model(x, training=True))

    @tf.function
    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return loss, tape.gradient(loss, weights)

    return forward, forward_backward


def time_forward_backward(
    model: Any, batch: int, warmup_seconds: float, min_iters: int, min_seconds: float, seed: int = 0
) -> dict[str, Any]:
    """Forward, backward and total milliseconds of ``model`` at ``batch``: :func:`forward_backward_stats` of the
    timed iterations (see the module docstring)."""
    tf = lazy_import("tensorflow", purpose="forward/backward timing")
    in_shape, classes = check_classifier(model, model.name)
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.uniform(-1, 1, (batch, *in_shape)).astype(np.float32))
    y = tf.constant(rng.integers(0, classes, batch))
    forward, forward_backward = forward_backward_functions(model, x, y)
    for fn in (forward, forward_backward):  # trace and first run
        fn(x, y)
    _sync(tf)
    end = time.perf_counter() + warmup_seconds
    while time.perf_counter() < end:
        forward(x, y)
        forward_backward(x, y)
        _sync(tf)
    fwd: list[float] = []
    total: list[float] = []
    start = time.perf_counter()
    while len(fwd) < min_iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        forward(x, y)
        _sync(tf)
        t1 = time.perf_counter()
        forward_backward(x, y)
        _sync(tf)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        total.append(t2 - t1)
    return forward_backward_stats(np.asarray(fwd) * 1e3, np.asarray(total) * 1e3, batch)


def forward_backward_stats(
    forward_ms: Sequence[float], total_ms: Sequence[float], batch: int, confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """The row fields of paired forward and forward+backward times (see the module docstring).

    Args:
        forward_ms, total_ms: Per-iteration times in milliseconds, ``total_ms[i]`` timed right after
            ``forward_ms[i]`` (the pairs are what cancels the machine's drift).
        batch: Images per pass (for the per-image fields).
        confidence: Of backward's interval.

    Returns:
        Flat fields: ``forward_ms`` and ``total_ms`` (medians), ``backward_ms`` (median of the paired differences,
        None when not resolved), ``backward_ms_ci_low`` / ``_ci_high`` / ``_ci_coverage`` (its interval, whose low
        end may be below 0: it bounds a difference, not a time), ``backward_resolved``, ``backward_why`` (why not
        resolved, else None), the means and per-image times.

    Raises:
        ValueError: Different numbers of forward and total times, or none.
    """
    f_ms, t_ms = np.asarray(forward_ms, dtype=np.float64), np.asarray(total_ms, dtype=np.float64)
    if f_ms.shape != t_ms.shape or f_ms.ndim != 1 or not f_ms.size:
        raise ValueError(f"forward and total times must pair up, got {f_ms.shape} and {t_ms.shape}")
    diff = t_ms - f_ms
    low, high, coverage = median_interval(diff, confidence)
    why = None
    if coverage < confidence:
        why = (
            f"{diff.size} iterations give its interval only {coverage * 100:.0f} % coverage, below "
            f"{confidence * 100:.0f} % (time more iterations)"
        )
    elif low <= 0:
        why = (
            f"the {confidence * 100:.0f} % interval of the per-iteration difference, [{low:.3g}, {high:.3g}] ms, "
            "reaches 0"
        )
    forward, total = float(np.median(f_ms)), float(np.median(t_ms))
    return {
        "batch": batch,
        "iterations": int(diff.size),
        "forward_ms": forward,
        "backward_ms": float(np.median(diff)) if why is None else None,
        "total_ms": total,
        "backward_ms_ci_low": low,
        "backward_ms_ci_high": high,
        "backward_ms_ci_coverage": coverage,
        "backward_resolved": why is None,
        "backward_why": why,
        "forward_ms_mean": float(f_ms.mean()),
        "total_ms_mean": float(t_ms.mean()),
        "forward_ms_per_image": forward / batch,
        "total_ms_per_image": total / batch,
    }


def backward_text(row: dict[str, Any], digits: int = 2) -> str:
    """Backward's table cell: the median with its interval, or "not resolved" with the interval (never a negative
    time)."""
    interval = f"[{row['backward_ms_ci_low']:.{digits}f}, {row['backward_ms_ci_high']:.{digits}f}]"
    if not row["backward_resolved"]:
        return f"not resolved {interval}"
    return f"{row['backward_ms']:.{digits}f} {interval}"


def layer_forward_times(model: Any, batch: int, iters: int, seed: int = 0) -> list[dict[str, Any]]:
    """Forward time of each top-level layer on its own (training mode, ``tf.function``-compiled), fed the
    values it receives inside the network; slowest first. Layers used at several places are left out.

    Isolated layers lose the fusion a whole-graph run may get, so the times add up to about the forward time,
    not to it exactly.
    """
    tf = lazy_import("tensorflow", purpose="per-layer timing")
    keras = lazy_import("keras")
    in_shape, _ = check_classifier(model, model.name)
    layers, taps = [], []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        try:
            taps.append(layer.input)
        except (AttributeError, ValueError):  # several inbound nodes, or a subclassed model without a graph
            continue
        layers.append(layer)
    if not layers:
        raise ConfigError(f"{model.name}: per-layer times need a functional model")
    flat = keras.tree.flatten(taps)
    probe = keras.Model(model.inputs, flat)
    x = np.random.default_rng(seed).uniform(-1, 1, (batch, *in_shape)).astype(np.float32)
    values = probe(x, training=False)
    values = [tf.constant(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    out, pos = [], 0
    for layer, tap in zip(layers, taps):
        n = len(keras.tree.flatten(tap))
        args = keras.tree.pack_sequence_as(tap, values[pos : pos + n])
        pos += n
        fn = tf.function(lambda a, _layer=layer: _layer(a, training=True))
        fn(args)
        fn(args)
        _sync(tf)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn(args)
            _sync(tf)
            times.append(time.perf_counter() - t)
        out.append({"layer": layer.name, "type": type(layer).__name__, "forward_ms": float(np.mean(times)) * 1e3})
    out.sort(key=lambda r: -r["forward_ms"])
    return out


def run_fb(cfg: FBConfig) -> list[dict[str, Any]]:
    """Forward/backward rows of one model, one per batch size (in this process)."""
    tf = lazy_import("tensorflow", purpose="forward/backward timing")
    if cfg.threads:
        tf.config.threading.set_intra_op_parallelism_threads(cfg.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)

    t0 = time.perf_counter()
    weights = cfg.weights or "random"
    if is_model_file(cfg.model) and not cfg.preprocess:
        preprocess = PreprocessSpec()  # timing needs no normalisation; a full model file knows its input size
    else:
        preprocess = resolve_preprocess(cfg.model, weights, cfg.preprocess)
    loaded = load_model(cfg.model, weights, preprocess)
    spec = getattr(loaded, "spec", None)
    if spec is not None and spec.task != "classification":
        raise ConfigError(f"{cfg.model} is a {spec.task} model; forward/backward timing takes classification models")
    model = loaded.model
    check_classifier(model, cfg.model)
    load_s = time.perf_counter() - t0
    device = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    rows = []
    for b in cfg.batch_sizes:
        row: dict[str, Any] = {
            "harness": "forward-backward",
            "model": loaded.name,
            "target": "keras-fp32 (train)",
            "runtime": "tensorflow",
            "device": device,
            "threads": cfg.threads,
            "params": int(model.count_params()),
            "load_s": load_s,
        }
        row.update(time_forward_backward(model, b, cfg.warmup_seconds, cfg.min_queries, cfg.min_seconds))
        if cfg.per_layer:
            layers = layer_forward_times(model, b, cfg.min_queries)
            row["layers_timed"] = len(layers)
            row["layers_forward_ms_sum"] = float(sum(r["forward_ms"] for r in layers))
            row["slowest_layers"] = layers[:SLOWEST_LAYERS]
        row["config"] = asdict(cfg)
        rows.append(row)
    return rows


def forward_backward(configs: Sequence[FBConfig], timeout: float | None = None) -> list[dict[str, Any]]:
    """Run each model's timing in its own process; the rows of all of them."""
    rows: list[dict[str, Any]] = []
    for cfg in configs:
        result = run_worker(
            "quantship.evaluate.fbtime", asdict(cfg), f"forward/backward timing of {cfg.model}", timeout
        )
        rows += result["rows"]
    return rows


def _run_payload(payload: dict[str, Any]) -> dict[str, Any]:
    payload["batch_sizes"] = tuple(payload["batch_sizes"])
    return {"rows": run_fb(FBConfig(**payload))}


if __name__ == "__main__":
    worker_main(_run_payload)
