"""The backends a sensitivity study quantizes layer by layer: the Q/DQ ONNX model (TensorRT's placement, run
on ONNX Runtime) and TFLite full int8 (a deny list of ops kept in float)."""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from quantship.config import IODType, Precision
from quantship.convert.layer_names import WEIGHTED_KERAS, segment_layer
from quantship.convert.qdq import insert_qdq
from quantship.convert.tflite import (
    TfliteSpec,
    follow_movement,
    layer_nodes,
    movement_neighbours,
    operator_kinds,
    tensor_name,
)
from quantship.evaluate.loop import runner_outputs
from quantship.fileio import temp_dir
from quantship.lazy import lazy_import
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
        from onnx.utils import Extractor

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
        # Values travel as the batches they were computed in (no copy of the early layers' large tensors).
        state = {graph.inputs[0]: [x[i : i + 32] for i in range(0, len(x), 32)]}
        previous: list[str] = [graph.inputs[0]]
        extractor = Extractor(_with_shapes(source))  # every prefix is cut from the same model
        for k, layer in enumerate(layers):
            cut = graph.position[layers[k + 1]] if cumulative and k + 1 < len(layers) else graph.position[layer]
            if cumulative and k + 1 == len(layers):
                outputs.append(self.run(x, only=layers))
                break
            live = graph.live(cut)
            state = self._advance(extractor, state, previous, live)
            previous = live
            only = layers[: k + 1] if cumulative else [layer]
            model, _ = insert_qdq(self.model, self.amax, node_layers=self.node_layers, include=only)
            outputs.append(self._suffix(model, live, state))
        return outputs

    def _session(self, model: Any) -> Any:
        return make_session(model, self.threads, session_config=QDQ_FAKE_QUANT, what="Q/DQ model part")

    def _advance(
        self, extractor: Any, state: dict[str, list[np.ndarray]], inputs: list[str], live: list[str]
    ) -> dict[str, list[np.ndarray]]:
        """The values of the ``live`` tensors (batch by batch), computed from ``state`` (those of ``inputs``)."""
        carried = {t: state[t] for t in live if t in state}
        wanted = [t for t in live if t not in state]
        if not wanted:
            return carried
        session = self._session(extractor.extract_model(inputs, wanted))
        names = [i.name for i in session.get_inputs()]
        parts = [session.run(wanted, {t: state[t][c] for t in names}) for c in range(len(state[names[0]]))]
        return {**carried, **{t: [p[j] for p in parts] for j, t in enumerate(wanted)}}

    def _suffix(self, model: Any, live: list[str], state: dict[str, list[np.ndarray]]) -> np.ndarray:
        from onnx.utils import Extractor

        output = model.graph.output[0].name
        session = self._session(Extractor(_with_shapes(model)).extract_model(live, [output]))
        names = [i.name for i in session.get_inputs()]
        return np.concatenate(
            [session.run([output], {t: state[t][c] for t in names})[0] for c in range(len(state[names[0]]))]
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
        self._cuts: _TfliteCuts | None = None
        self._models: dict[tuple, bytes] = {}  # cut models made once (float segments, one-layer variants)
        self._kept = 0  # bytes of one-layer variants kept in _models

    def model_bytes(self, floats: set[str], nodes: Iterable[str] = ()) -> bytes:
        """The int8 model with the ``floats`` layers' ops and the ``nodes`` ops kept in float."""

        if not self.fast:
            spec = TfliteSpec(Precision.INT8, float_layers=tuple(sorted(floats)), float_nodes=tuple(nodes))
            return self.converter.convert(spec, self.calibration)
        denied = follow_movement([*self.denylist_nodes(sorted(floats)), *nodes], self.cuts().movement)
        return self.converter.quantize_calibrated(self._calibration(), IODType.FLOAT32, float_nodes=denied)

    def run(self, x: np.ndarray, float_layers: Iterable[str] = (), only: Iterable[str] | None = None) -> np.ndarray:
        """Outputs with ``float_layers`` in float (the rest int8), or with only the ops of the ``only`` layers
        int8 (every other op float: pooling and a softmax too, which TFLite would otherwise quantize in every
        configuration and, on low-confidence images, cost more agreement than any one layer)."""

        floats = set(float_layers)
        nodes = self.nodes_outside(only) if only is not None else []
        return np.concatenate(self._run_model(self.model_bytes(floats, nodes), [_chunks(x)])[0])

    def run_layers(self, x: np.ndarray, layers: Sequence[str], cumulative: bool = False) -> list[np.ndarray]:
        """:meth:`run` with ``only=[layer]`` (or ``only=layers[:k+1]``) for every layer, in graph order, each
        variant started at its layer rather than at the model's input (the same outputs, bit for bit: a test
        checks it). With one layer int8 everything before its first op is the float model, so the float values
        alive there are carried from cut to cut (one float segment per layer, one forward pass in all) and each
        variant is quantized and run from that cut on; cumulatively, the values alive at layer k+1's cut are
        those of row k's own variant, so each row runs from its layer's cut and hands them on.

        The cut models come from the calibrate-only model, whose recorded ranges travel with every tensor, so
        the quantizer gives each op the scales it has in the whole model; a tensor a float op hands to an int8
        one is quantized at that boundary in both. The values travel as the chunks they were computed in (no
        copy of the early layers' large tensors into one array)."""
        layers = list(layers)
        cuttable = self.fast and self.cuts().single_graph
        if not cuttable or [layer for layer in self.cuts().order if layer in set(layers)] != layers:
            return [self.run(x, only=layers[: k + 1] if cumulative else [layer]) for k, layer in enumerate(layers)]
        graph = self.cuts()
        outputs: list[np.ndarray] = []
        state = {graph.input: _chunks(x)}
        start = 0
        for k, layer in enumerate(layers):
            if not cumulative and graph.position[layer] > start:
                # The float model up to this layer's cut: the calibrate-only model runs as the float model.
                state = self._advance(start, graph.position[layer], state)
                start = graph.position[layer]
            nxt = graph.position[layers[k + 1]] if cumulative and k + 1 < len(layers) else None
            handed = [t for t in graph.live(nxt) if t not in state] if nxt is not None else []
            only = tuple(layers[: k + 1] if cumulative else [layer])
            got = self._run_model(self._variant(start, only, tuple(handed)), [state[t] for t in graph.live(start)])
            outputs.append(np.concatenate(got[0]))
            if nxt is not None:
                state = {**{t: state[t] for t in graph.live(nxt) if t in state}, **dict(zip(handed, got[1:]))}
                start = nxt
        return outputs

    def _variant(self, start: int, only: tuple[str, ...], handed: tuple[str, ...]) -> bytes:
        """The variant with only the ``only`` layers int8, from the cut at ``start``, giving the model's output
        and the ``handed`` tensors. A one-layer variant is kept: the screened study runs it again on the other
        half of the images."""
        key = (start, only, handed)
        if key in self._models:
            return self._models[key]
        graph = self.cuts()
        outside = follow_movement(self.nodes_outside(only), graph.movement)
        denied = [n for n in outside if graph.made_at_or_after(n, start)]
        data = self.converter.quantize_calibrated(
            graph.cut(start, None, [graph.output, *handed]), IODType.FLOAT32, float_nodes=denied
        )
        if len(only) == 1 and not handed and self._kept + len(data) <= KEPT_VARIANT_BYTES:
            self._models[key] = data
            self._kept += len(data)
        return data

    def _advance(self, start: int, stop: int, state: dict[str, list[np.ndarray]]) -> dict[str, list[np.ndarray]]:
        """The values of the tensors alive at ``stop``, from ``state`` (those alive at ``start``), through the
        float model's operators ``start..stop``, one layer's segment at a time (each cut once, then kept)."""
        graph = self.cuts()
        stops = sorted({graph.position[n] for n in self.layers if start < graph.position.get(n, -1) < stop})
        for a, b in zip([start, *stops], [*stops, stop]):
            live = graph.live(b)
            wanted = [t for t in live if t not in state]
            got: list[list[np.ndarray]] = []
            if wanted:
                if (a, b) not in self._models:
                    self._models[(a, b)] = graph.cut(a, b, wanted)
                got = self._run_model(self._models[(a, b)], [state[t] for t in graph.live(a)])
            state = {**{t: state[t] for t in live if t in state}, **dict(zip(wanted, got))}
        return state

    def cuts(self) -> "_TfliteCuts":
        if self._cuts is None:
            self._cuts = _TfliteCuts(self._calibration(), {layer.name for layer in self.converter.model.layers})
        return self._cuts

    def _calibration(self) -> bytes:
        if self._calibrated is None:
            self._calibrated = self.converter.calibrate_only(self.calibration)
        return self._calibrated

    def nodes_outside(self, layers: Iterable[str]) -> list[str]:
        """The deny list that leaves only the ops of ``layers`` int8 (``TfliteConverter.nodes_outside``'s rule),
        named as in the calibrate-only model that the quantizer reads (no float conversion made to learn them)."""
        if not self.fast:
            return self.converter.nodes_outside(layers)
        graph, keep = self.cuts(), set(layers)
        names = graph.layer_names
        return [n for n in graph.op_outputs if not any(segment_layer(p, names) in keep for p in n.split(";"))]

    def denylist_nodes(self, layers: Iterable[str]) -> list[str]:
        """The deny list that keeps the ops of ``layers`` in float (``TfliteConverter.denylist_nodes``), named as
        :meth:`nodes_outside` names them."""
        if not self.fast:
            return self.converter.denylist_nodes(layers)
        graph = self.cuts()
        return layer_nodes(graph.op_outputs, graph.layer_names, layers)

    def op_kinds(self) -> list[tuple[str, str]]:
        """(builtin operator, output tensor) of every op, in execution order, named as :meth:`nodes_outside`
        names them."""
        return self.cuts().op_kinds if self.fast else self.converter.op_kinds()

    def op_outputs(self) -> list[str]:
        return [name for _, name in self.op_kinds()]

    def _run_model(self, data: bytes, inputs: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        """Every output of the model ``data`` (in its order, chunk by chunk) fed ``inputs`` (in its order, each a
        list of chunks: :func:`_chunks`)."""
        with temp_dir(self.converter.work_dir, "sensitivity") as tmp:
            path = tmp / "m.tflite"
            path.write_bytes(data)
            with make_runner(path, RunnerOptions(threads=self.threads)) as r:
                names = [m.name for m in r.input_metadata()]
                parts = [
                    list(r.infer({t: v[c] for t, v in zip(names, inputs)}).values()) for c in range(len(inputs[0]))
                ]
        return [[p[j] for p in parts] for j in range(len(parts[0]))]


# One-layer TFLite variants kept for the screened study's second half, at most this many bytes (a larger model
# re-quantizes those past the budget).
KEPT_VARIANT_BYTES = 1 << 30


def _chunks(x: np.ndarray, most: int = 32) -> list[np.ndarray]:
    """``x`` in equal chunks of at most ``most`` images: one tensor allocation per model, not one more for a short
    last batch."""
    step = -(-len(x) // -(-len(x) // most)) if len(x) else 1
    return [x[i : i + step] for i in range(0, len(x), step)]


class _TfliteCuts:
    """The calibrate-only TFLite model's operators in execution order: each Keras layer's first op, the tensors
    alive at each position (made before it, read at or after it), and models cut out of it."""

    def __init__(self, calibrated: bytes, layer_names: set[str]):
        fu = lazy_import("tensorflow.lite.tools.flatbuffer_utils", "tensorflow", "cutting TFLite models")
        self._fu = fu
        self._model = fu.convert_bytearray_to_object(calibrated)
        sg = self._model.subgraphs[0]
        self._sg, self._ops = sg, list(sg.operators)
        # A model with control flow (WHILE, IF) runs other subgraphs, and the study feeds one input: any other
        # model is not cut, each variant runs whole.
        self.single_graph = len(self._model.subgraphs) == 1 and len(sg.inputs) == 1
        self.layer_names = layer_names
        self.names = [tensor_name(t) for t in sg.tensors]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.input, self.output = self.names[sg.inputs[0]], self.names[sg.outputs[0]]
        self.op_kinds = operator_kinds(self._model)
        self.op_outputs = [name for _, name in self.op_kinds]
        self.movement = movement_neighbours(self._model)
        self.position: dict[str, int] = {}
        self.order: list[str] = []
        made: dict[int, int] = {int(t): -1 for t in sg.inputs}
        last: dict[int, int] = {}
        for i, op in enumerate(self._ops):
            for t in op.outputs:
                made[int(t)] = i
                for part in self.names[t].split(";"):
                    layer = segment_layer(part, layer_names)
                    if layer is not None and layer not in self.position:
                        self.position[layer] = i
                        self.order.append(layer)
            for t in op.inputs:
                if t >= 0:
                    last[int(t)] = i
        for t in sg.outputs:
            last[int(t)] = len(self._ops)
        self._made, self._last = made, last

    def live(self, position: int) -> list[str]:
        return [self.names[t] for t, i in self._made.items() if i < position and self._last.get(t, -2) >= position]

    def made_at_or_after(self, tensor: str, position: int) -> bool:
        return self._made.get(self.index[tensor], -1) >= position

    def cut(self, start: int, stop: int | None, outputs: list[str]) -> bytes:
        """The operators ``start..stop`` (to the end when None), fed the tensors alive at ``start``, giving
        ``outputs``: a model of only the tensors and buffers those operators use (serializing all of the model's
        tensors for every cut cost about what quantizing it does)."""
        ops = self._ops[start:stop]
        inputs = [self.index[t] for t in self.live(start)]
        outs = [self.index[t] for t in outputs]
        used = sorted({int(t) for op in ops for t in (*op.inputs, *op.outputs) if t >= 0} | {*inputs, *outs})
        remap = {old: new for new, old in enumerate(used)}
        buffers = [self._model.buffers[0]]  # buffer 0: the empty one the schema reserves
        tensors = []
        for old in used:
            tensor = copy.copy(self._sg.tensors[old])
            if tensor.buffer:
                buffers.append(self._model.buffers[tensor.buffer])
                tensor.buffer = len(buffers) - 1
            tensors.append(tensor)
        metadata = []
        for m in self._model.metadata or []:
            m = copy.copy(m)
            buffers.append(self._model.buffers[m.buffer])
            m.buffer = len(buffers) - 1
            metadata.append(m)
        operators = []
        for op in ops:
            op = copy.copy(op)
            op.inputs = np.array([remap[int(t)] if t >= 0 else -1 for t in op.inputs], np.int32)
            op.outputs = np.array([remap[int(t)] for t in op.outputs], np.int32)
            operators.append(op)
        sg = copy.copy(self._sg)
        sg.tensors, sg.operators = tensors, operators
        sg.inputs = np.array([remap[t] for t in inputs], np.int32)
        sg.outputs = np.array([remap[t] for t in outs], np.int32)
        model = copy.copy(self._model)
        model.subgraphs, model.buffers, model.metadata = [sg], buffers, metadata
        model.metadataBuffer, model.signatureDefs = None, []  # the signatures name the whole model's tensors
        return bytes(self._fu.convert_object_to_bytearray(model))
