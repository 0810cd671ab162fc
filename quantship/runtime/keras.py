"""Keras runner: the fp32 reference."""

from __future__ import annotations

from typing import Any

import numpy as np

from quantship.lazy import is_available
from quantship.runtime.base import Runner, RunnerOptions, TensorMeta
from quantship.runtime.registry import RuntimeInfo, register_runtime


class KerasRunner(Runner):
    """Runs an in-memory ``keras.Model`` (TensorFlow backend, CPU here) in inference mode."""

    def __init__(self, model: Any, name: str = "keras-fp32"):
        super().__init__(name)
        self.model = model
        self._fn = None

    def activate_impl(self) -> None:
        import tensorflow as tf

        model = self.model
        # One trace for every batch size: the batch dimension is left open in the signature.
        signature = [tf.TensorSpec((None, *t.shape[1:]), tf.float32) for t in model.inputs]
        self._fn = tf.function(
            lambda *xs: model(list(xs) if len(xs) > 1 else xs[0], training=False), input_signature=signature
        )

    def infer_impl(self, feed: dict[str, np.ndarray], raw: bool) -> dict[str, np.ndarray]:
        out = self._time_runtime(self._fn, *[feed[m.name] for m in self.input_metadata()])
        outs = out if isinstance(out, (list, tuple)) else [out]
        return {m.name: np.asarray(o) for m, o in zip(self.output_metadata(), outs)}

    def deactivate_impl(self) -> None:
        self._fn = None

    def input_metadata_impl(self) -> list[TensorMeta]:
        return [TensorMeta(t.name.split(":")[0], tuple(t.shape), np.dtype("float32")) for t in self.model.inputs]

    def output_metadata_impl(self) -> list[TensorMeta]:
        return [
            TensorMeta(f"output_{i}", tuple(t.shape), np.dtype("float32")) for i, t in enumerate(self.model.outputs)
        ]


def _make(source: Any, options: RunnerOptions, name: str | None) -> KerasRunner:
    return KerasRunner(source, name=name or "keras-fp32")


register_runtime(
    RuntimeInfo(
        "keras",
        _make,
        description="Keras (TensorFlow backend), in memory: the fp32 reference",
        available=lambda: is_available("keras") and is_available("tensorflow"),
        distributions=("tensorflow", "keras"),
    )
)


def layer_outputs(model: Any, layers: list[str]) -> Any:
    """A function from an input batch to ``{layer: output}`` for the named layers of a single-input Keras model
    (one multi-output model, one trace for every batch size); an input layer's output is the input itself."""
    import keras
    import tensorflow as tf

    inner = [name for name in layers if model.get_layer(name).output is not model.inputs[0]]
    probe = keras.Model(model.inputs, [model.get_layer(name).output for name in inner])
    signature = [tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32)]
    fn = tf.function(lambda x: probe(x, training=False), input_signature=signature)

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        outs = fn(x)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        values = {name: np.asarray(o) for name, o in zip(inner, outs)}
        return {name: values[name] if name in values else np.asarray(x, np.float32) for name in layers}

    return run
