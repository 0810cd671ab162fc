"""The backends a sensitivity study quantizes layer by layer: the Q/DQ ONNX model (TensorRT's placement, run
on ONNX Runtime) and TFLite full int8 (a deny list of ops kept in float)."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from quantship.config import IODType, Precision
from quantship.convert.layer_names import WEIGHTED_KERAS
from quantship.convert.qdq import insert_qdq
from quantship.convert.tflite import TfliteSpec
from quantship.evaluate.loop import runner_outputs
from quantship.fileio import temp_dir
from quantship.runtime.base import RunnerOptions
from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT, OnnxRunner, make_session
from quantship.runtime.registry import make_runner

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

        self.converter, self.calibration, self.fast = converter, calibration, fast
        # LiteRT runs one thread when not told (ONNX Runtime: every core); a study is throughput, and the
        # outputs do not depend on the thread count (tests/test_sensitivity.py checks it).
        self.threads = threads or os.cpu_count() or 1
        self.layers = [layer.name for layer in converter.model.layers if type(layer).__name__ in WEIGHTED_KERAS]
        self._calibrated: bytes | None = None

    def model_bytes(self, floats: set[str], nodes: Iterable[str] = ()) -> bytes:
        """The int8 model with the ``floats`` layers' ops and the ``nodes`` ops kept in float."""

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

        floats = set(float_layers)
        nodes = self.converter.nodes_outside(only) if only is not None else []
        data = self.model_bytes(floats, nodes)
        with temp_dir(self.converter.work_dir, "sensitivity") as tmp:
            path = tmp / "m.tflite"
            path.write_bytes(data)
            with make_runner(path, RunnerOptions(threads=self.threads)) as r:
                return runner_outputs(r, x)
