"""Fallback units beyond the weighted layers: softmax, residual adds, pooling and the model's output op, for the
TFLite and the Q/DQ backends alike, ranked with the layers by the same measures, then the greedy float set pruned.

A *unit* is what a fallback can keep in float. The weighted Keras layers are units (named by the layer); every
other op either backend quantizes is one too, keyed ``<kind>:<Keras layer>`` (``add:block2_add``,
``softmax:probs``) so that the same op of the TFLite and the Q/DQ model shares one key and one float set serves
both backends; an op named after no Keras layer (TFLite's classifier softmax, ``StatefulPartitionedCall:0``) is
keyed by its tensor. A backend ignores the keys it does not have (the Q/DQ placement never quantizes a softmax).

Ranking uses :func:`quantship.sensitivity.scoring.score` on the model with *only that unit* int8 (everything else
float), as the layer study does; the searches themselves live in :mod:`quantship.sensitivity.fallback` (which
imports this module, never the reverse): ``find_fallback`` adds units in rank order until every backend passes the
gate, ``prune_fallback`` then returns to int8 every unit whose return keeps the gate met (least harmful first), so
a unit taken early that a later one made unnecessary does not stay float.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from quantship.convert.layer_names import segment_layer
from quantship.convert.qdq import activation_inputs, insert_qdq
from quantship.convert.tflite import MOVEMENT_OPS
from quantship.evaluate.loop import runner_outputs
from quantship.fileio import temp_dir
from quantship.runtime.base import RunnerOptions
from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT, OnnxRunner
from quantship.runtime.registry import make_runner
from quantship.sensitivity.scoring import score

# TFLite ops that are not units: the quantization boundary itself, and the ops that move values without
# arithmetic, which a deny list takes along with their neighbours (convert.tflite.follow_movement).
TFLITE_SKIPPED = {"QUANTIZE", "DEQUANTIZE", *MOVEMENT_OPS}
TFLITE_KINDS = {
    "SOFTMAX": "softmax",
    "ADD": "add",
    "MEAN": "pool",
    "AVERAGE_POOL_2D": "pool",
    "MAX_POOL_2D": "pool",
    "MUL": "mul",
    "CONCATENATION": "concat",
    "LOGISTIC": "sigmoid",
    "HARD_SWISH": "hard_swish",
}
ONNX_KINDS = {"Add": "add", "GlobalAveragePool": "pool", "AveragePool": "pool", "MaxPool": "pool"}


@dataclass(frozen=True)
class OpUnit:
    """One op (or the ops of one Keras layer) outside the weighted layers, in one backend."""

    key: str
    kind: str  # softmax, add, pool, output, ...
    backend: str  # tflite or qdq
    nodes: tuple[str, ...]  # TFLite op output names (deny list) or ONNX node names (Q/DQ exclude)


def _layer(name: str, layer_names: set[str]) -> str | None:
    return next((la for part in name.split(";") if (la := segment_layer(part, layer_names))), None)


def tflite_units(backend: Any, weighted_layers: Iterable[str]) -> list[OpUnit]:
    """The TFLite model's ops outside the weighted layers that a fallback may keep in float; the graph's last op
    (the one whose int8 output is dequantized into the model's output) has kind ``output`` added to its own.

    ``backend``: a :class:`~quantship.sensitivity.backends.TfliteBackend` (its op names are the ones its quantizer
    reads, taken from the calibrate-only model without a float conversion)."""
    names = {layer.name for layer in backend.converter.model.layers}
    weighted = set(backend.denylist_nodes(list(weighted_layers))) if weighted_layers else set()
    kinds = backend.op_kinds()
    units: dict[str, list] = {}
    last = kinds[-1][1] if kinds else None
    for op, tensor in kinds:
        if tensor in weighted or op in TFLITE_SKIPPED:
            continue
        kind = TFLITE_KINDS.get(op, op.lower())
        layer = _layer(tensor, names)
        key = f"{kind}:{layer or tensor}"
        if tensor == last:
            kind = f"{kind}, output"
        units.setdefault(key, [kind, []])[1].append(tensor)
    return [OpUnit(k, kind, "tflite", tuple(nodes)) for k, (kind, nodes) in units.items()]


def qdq_units(model: Any, node_layers: dict[str, str], layer_names: set[str]) -> list[OpUnit]:
    """The Q/DQ model's quantized ops outside the weighted layers (residual adds, pooling)."""

    units: dict[str, list] = {}
    for k in activation_inputs(model):
        node = model.graph.node[k]
        if node.name in node_layers or node.op_type not in ONNX_KINDS:
            continue
        kind = ONNX_KINDS[node.op_type]
        key = f"{kind}:{_layer(node.name, layer_names) or node.name}"
        units.setdefault(key, [kind, []])[1].append(node.name)
    return [OpUnit(k, kind, "qdq", tuple(nodes)) for k, (kind, nodes) in units.items()]


@dataclass
class UnitBackend:
    """A sensitivity backend (:class:`~quantship.sensitivity.backends.TfliteBackend` or ``QdqBackend``) whose float
    sets may hold op unit keys besides Keras layer names."""

    inner: Any
    units: dict[str, OpUnit] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def layers(self) -> list[str]:
        return list(self.inner.layers)

    def _split(self, floats: Iterable[str]) -> tuple[list[str], list[str]]:
        floats = list(floats)
        layers = [f for f in floats if f in set(self.inner.layers)]
        nodes = [n for f in floats if f in self.units for n in self.units[f].nodes]
        return layers, nodes

    def artifact(self, floats: Iterable[str] = (), only_nodes: Sequence[str] | None = None) -> bytes:
        """The model bytes with ``floats`` (layers and unit keys) in float, or with only ``only_nodes`` int8."""
        layers, nodes = self._split(floats)
        if self.inner.name == "tflite":
            if only_nodes is not None:
                keep = set(only_nodes)
                return self.inner.model_bytes(set(), [n for n in self.inner.op_outputs() if n not in keep])
            return self.inner.model_bytes(set(layers), nodes)

        q = self.inner
        if only_nodes is not None:
            model, _ = insert_qdq(q.model, q.amax, node_layers=q.node_layers, include=list(only_nodes))
        else:
            model, _ = insert_qdq(q.model, q.amax, exclude=[*layers, *nodes], node_layers=q.node_layers)
        return model.SerializeToString()

    def _outputs(self, data: bytes, x: np.ndarray) -> np.ndarray:
        if self.inner.name == "tflite":
            with temp_dir(self.inner.converter.work_dir, "sensitivity") as tmp:
                path = tmp / "m.tflite"
                path.write_bytes(data)
                with make_runner(path, RunnerOptions(threads=self.inner.threads)) as r:
                    return runner_outputs(r, x)
        with OnnxRunner(data, num_threads=self.inner.threads, name="qdq", session_config=QDQ_FAKE_QUANT) as r:
            return runner_outputs(r, x)

    def run(self, x: np.ndarray, float_layers: Iterable[str] = (), only: Iterable[str] | None = None) -> np.ndarray:
        """Outputs with ``float_layers`` (layers and unit keys) in float; ``only``: the inner backend's study."""
        floats = list(float_layers)
        if only is not None or not any(f in self.units for f in floats):
            return self.inner.run(x, float_layers=[f for f in floats if f not in self.units], only=only)
        return self._outputs(self.artifact(floats), x)

    def run_unit_alone(self, x: np.ndarray, key: str) -> np.ndarray:
        """Outputs with only unit ``key`` int8 (every other op float): its harm, as the layer study measures."""
        return self._outputs(self.artifact(only_nodes=self.units[key].nodes), x)


def unit_sensitivity(backend: UnitBackend, held: Any) -> list[dict[str, Any]]:
    """One row per op unit of ``backend`` (that unit alone int8), shaped as the layer study's rows."""
    rows = []
    for k, (key, unit) in enumerate(backend.units.items()):
        rows.append(
            {
                "kind": "single",
                "backend": backend.name,
                "index": k,
                "layer": key,
                "unit_kind": unit.kind,
                "quantized_layers": 0,
                **score(backend.run_unit_alone(held.x, key), held),
            }
        )
    return rows


def unit_backends(setup: Any, inner: dict[str, Any]) -> dict[str, UnitBackend]:
    """The backends of a study (name -> ``TfliteBackend`` / ``QdqBackend``) with their op units."""
    names = {layer.name for layer in setup.loaded.model.layers}
    out = {}
    for name, b in inner.items():
        units = tflite_units(b, b.layers) if name == "tflite" else qdq_units(b.model, b.node_layers, names)
        out[name] = UnitBackend(b, {u.key: u for u in units})
    return out
