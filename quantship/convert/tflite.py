"""Keras -> TFLite at every precision: fp32, fp16, dynamic-range, full-integer int8, int16x8.

The Keras model is exported once to a SavedModel (the converter is about twice as fast from it as from a
live Keras model) and each precision is converted from that export. The converter's own console output
(hundreds of lines per call) goes to a log file.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from quantship.config import IODType, Precision
from quantship.convert.artifact import write_artifact
from quantship.convert.layer_names import keras_output_layer, segment_layer
from quantship.errors import CalibrationError, ConfigError, ConversionError
from quantship.fileio import make_temp_dir, remove_temp_dir, sha256_json
from quantship.lazy import lazy_import
from quantship.logs import redirect_native_output
from quantship.manifest import Artifact, load_reusable

TFLITE_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.DYNAMIC, Precision.INT8, Precision.INT16X8)


@dataclass(frozen=True)
class TfliteSpec:
    """What to convert to.

    Attributes:
        precision: One of :data:`TFLITE_PRECISIONS`.
        io_dtype: Input/output type for full-integer int8 (float32, int8 or uint8).
    """

    precision: Precision
    io_dtype: IODType = IODType.FLOAT32
    float_layers: tuple[str, ...] = ()  # Keras layer names kept in float (int8 only; float I/O)
    float_nodes: tuple[str, ...] = ()  # and op output tensors kept in float (see TfliteConverter.nodes_outside)

    def __post_init__(self) -> None:
        if self.precision not in TFLITE_PRECISIONS:
            raise ConfigError(f"TFLite has no precision '{self.precision.value}'")
        if self.io_dtype is not IODType.FLOAT32 and self.precision is not Precision.INT8:
            raise ConfigError(f"integer I/O ({self.io_dtype.value}) applies to full-integer int8 only")
        denied = self.float_layers or self.float_nodes
        if denied and (self.precision is not Precision.INT8 or self.io_dtype is not IODType.FLOAT32):
            raise ConfigError("float layers (a denylist) apply to int8 with float I/O only")

    @property
    def needs_calibration(self) -> bool:
        return self.precision in (Precision.INT8, Precision.INT16X8)


CalibrationFeed = Callable[[], Iterable[dict[str, np.ndarray] | np.ndarray]]


class TfliteConverter:
    """Converts one Keras model to any number of TFLite precisions.

    Args:
        model: The ``keras.Model``.
        log_path: File that receives the converter's console output (None: leave it on the console).
        work_dir: The run's output folder: the SavedModel export (tens of MB) is made in its ``.quantship-tmp/``
            and removed by :meth:`close` (or swept by the next run after a kill); None uses the system's temp
            folder.
    """

    def __init__(self, model: Any, log_path: str | Path | None = None, work_dir: str | Path | None = None):
        self.model = model
        self.log_path = Path(log_path) if log_path else None
        self.work_dir = Path(work_dir) if work_dir else None
        self._export_dir: Path | None = None

    def _saved_model(self) -> Path:
        if self._export_dir is None:
            tmp = make_temp_dir(self.work_dir, "savedmodel")
            try:
                with redirect_native_output(self.log_path):
                    self.model.export(str(tmp / "model"), format="tf_saved_model", verbose=False)
            except BaseException as exc:  # Keras raises many types; Ctrl-C must not leave the export behind
                remove_temp_dir(tmp)
                if not isinstance(exc, Exception):
                    raise
                raise ConversionError(f"exporting the Keras model to a SavedModel failed: {exc}") from None
            self._export_dir = tmp
        return self._export_dir / "model"

    def close(self) -> None:
        if self._export_dir is not None:
            remove_temp_dir(self._export_dir)
            self._export_dir = None

    def __enter__(self) -> "TfliteConverter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def convert(self, spec: TfliteSpec, calibration: CalibrationFeed | None = None) -> bytes:
        """Return the flatbuffer for ``spec``.

        Args:
            spec: Precision and I/O type.
            calibration: For int8/int16x8, a callable returning a fresh iterable of input batches (the
                representative dataset); each batch is split into single images for the converter.

        Raises:
            CalibrationError: Calibration needed but missing or empty.
            ConversionError: The converter failed (its log file holds the details).
        """
        tf = lazy_import("tensorflow", purpose="TFLite conversion")
        if spec.needs_calibration and calibration is None:
            raise CalibrationError(f"TFLite {spec.precision.value} needs a calibration feed")
        conv = tf.lite.TFLiteConverter.from_saved_model(str(self._saved_model()))
        p = spec.precision
        if p is not Precision.FP32:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        if p is Precision.FP16:
            # Without Optimize.DEFAULT this setting is silently ignored (fp32 file): set above.
            conv.target_spec.supported_types = [tf.float16]
        seen = [0]
        if spec.needs_calibration:
            conv.representative_dataset = _representative(calibration, seen)
        if p is Precision.INT8:
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            io = {IODType.FLOAT32: tf.float32, IODType.INT8: tf.int8, IODType.UINT8: tf.uint8}[spec.io_dtype]
            conv.inference_input_type = io
            conv.inference_output_type = io
        if p is Precision.INT16X8:
            conv.target_spec.supported_ops = [
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
            ]
        if spec.float_layers or spec.float_nodes:
            return self._convert_with_denylist(conv, spec, calibration, seen)
        try:
            with redirect_native_output(self.log_path):
                data = conv.convert()
        except CalibrationError:
            raise
        except Exception as exc:  # noqa: BLE001 - the converter raises ConverterError, ValueError, ...
            raise self._failure(spec, exc) from None
        if spec.needs_calibration and seen[0] == 0:
            raise CalibrationError("the calibration feed yielded no images")
        return bytes(data)

    def float_model_tensor_names(self) -> list[str]:
        """Tensor names of the float model (what the quantization debugger's denylist takes)."""
        return [tensor_name(t) for t in self._float_model().subgraphs[0].tensors]

    def _float_model(self) -> Any:
        """The float model as a flatbuffer object (converted once; its op names are the deny list's)."""
        if getattr(self, "_float_object", None) is None:
            from tensorflow.lite.tools import flatbuffer_utils

            data = self.convert(TfliteSpec(Precision.FP32))
            self._float_object = flatbuffer_utils.convert_bytearray_to_object(data)
        return self._float_object

    def op_outputs(self) -> list[str]:
        """Output tensor names of the float model's operators (no weights or constants)."""
        return [name for _, name in self.op_kinds()]

    def op_kinds(self) -> list[tuple[str, str]]:
        """(builtin operator name, output tensor name) of every operator of the float model, in graph order."""
        return operator_kinds(self._float_model())

    def movement_neighbours(self) -> dict[str, tuple[str, ...]]:
        """:func:`movement_neighbours` of the float model."""
        return movement_neighbours(self._float_model())

    def nodes_outside(self, layers: Iterable[str]) -> list[str]:
        """The deny list that leaves only the ops of the given Keras layers int8: every operator output none of
        whose fused parts belongs to them, including ops named after no layer (a classifier's softmax)."""
        names = {layer.name for layer in self.model.layers}
        keep = set(layers)
        return [n for n in self.op_outputs() if not any(segment_layer(p, names) in keep for p in n.split(";"))]

    def denylist_nodes(self, float_layers: Iterable[str]) -> list[str]:
        """Output tensor names of the ops that belong to the given Keras layers (the quantization debugger's and
        :meth:`quantize_calibrated`'s deny list).

        Raises:
            ConfigError: A layer with no TFLite op.
        """
        return layer_nodes(self.float_model_tensor_names(), {layer.name for layer in self.model.layers}, float_layers)

    def _convert_with_denylist(
        self, conv: Any, spec: TfliteSpec, calibration: CalibrationFeed, seen: list[int]
    ) -> bytes:
        """int8 with the given Keras layers kept in float, via the converter's quantization debugger."""
        tf = lazy_import("tensorflow")
        nodes = [*self.denylist_nodes(spec.float_layers), *spec.float_nodes]
        nodes = follow_movement(nodes, self.movement_neighbours())
        if set(self.op_outputs()) <= set(nodes):
            # Every op float: the float model (the debugger refuses a model with nothing quantized).
            return self.convert(TfliteSpec(Precision.FP32))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        conv.inference_input_type = tf.float32
        conv.inference_output_type = tf.float32
        options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=nodes)
        try:
            # The debugger runs TensorFlow's deprecated tf.lite.Interpreter and says so on every call.
            with redirect_native_output(self.log_path), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                debugger = tf.lite.experimental.QuantizationDebugger(
                    converter=conv, debug_dataset=_representative(calibration, seen), debug_options=options
                )
                return bytes(debugger.get_nondebug_quantized_model())
        except CalibrationError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._failure(spec, exc) from None

    # ------------------------------------------------------------------ calibrate once, quantize many times

    def calibrate_only(self, calibration: CalibrationFeed) -> bytes:
        """The float model with every activation's min/max recorded by the converter's own calibrator, not yet
        quantized (the converter's private calibrate-only path: see :func:`check_private_api`).

        :meth:`quantize_calibrated` turns it into full-integer models: with any ranges replaced by ours
        (``tflite-int8-<method>``) or with a deny list (sensitivity), without calibrating again.

        Raises:
            CalibrationError: An empty or non-finite feed.
            ConversionError: The converter failed, or TensorFlow changed the private API.
        """
        tf = lazy_import("tensorflow", purpose="TFLite conversion")
        check_private_api()
        conv = tf.lite.TFLiteConverter.from_saved_model(str(self._saved_model()))
        if not hasattr(conv, CALIBRATE_ONLY_ATTR):
            raise ConversionError(_api_changed(f"TFLiteConverter has no attribute {CALIBRATE_ONLY_ATTR}"))
        seen = [0]
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = _representative(calibration, seen)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.experimental_new_quantizer = True
        setattr(conv, CALIBRATE_ONLY_ATTR, True)
        spec = TfliteSpec(Precision.INT8)
        try:
            with redirect_native_output(self.log_path):
                data = conv.convert()
        except CalibrationError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._failure(spec, exc) from None
        if seen[0] == 0:
            raise CalibrationError("the calibration feed yielded no images")
        return bytes(data)

    def quantize_calibrated(
        self,
        calibrated: bytes,
        io_dtype: IODType = IODType.INT8,
        ranges: dict[int, tuple[float, float]] | None = None,
        float_nodes: Iterable[str] = (),
    ) -> bytes:
        """Quantize a :meth:`calibrate_only` model as ``convert`` would (per-channel weights, the new quantizer).

        Args:
            calibrated: The calibrate-only flatbuffer.
            io_dtype: Input/output type (float I/O when ``float_nodes`` is given).
            ranges: Tensor index -> (min, max) replacing the converter's recorded range.
            float_nodes: Output tensor names of ops to keep in float (the quantization debugger's deny list).
        """
        tf = lazy_import("tensorflow", purpose="TFLite conversion")
        check_private_api()
        from tensorflow.lite.python import convert as tfl_convert

        if ranges:
            calibrated = set_tensor_ranges(calibrated, ranges)
        io = {IODType.FLOAT32: tf.float32, IODType.INT8: tf.int8, IODType.UINT8: tf.uint8}[io_dtype]
        nodes = list(float_nodes)
        try:
            with redirect_native_output(self.log_path), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = tfl_convert.mlir_quantize(
                    calibrated,
                    disable_per_channel=False,
                    input_data_type=io,
                    output_data_type=io,
                    denylisted_nodes=nodes or None,
                    disable_per_channel_for_dense_layers=False,
                )
        except Exception as exc:  # noqa: BLE001
            raise self._failure(TfliteSpec(Precision.INT8, io_dtype), exc) from None
        return bytes(data)

    def _failure(self, spec: TfliteSpec, exc: Exception) -> ConversionError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"; converter log: {self.log_path}" if self.log_path else ""
        return ConversionError(f"TFLite {spec.precision.value} conversion failed: {first}{where}")


# The converter's private calibrate-only path (TensorFlow 2.21, ``tensorflow/lite/python/lite.py``
# ``TFLiteConverterBase._quantize``): with ``_experimental_calibrate_only`` set, ``convert()`` runs the
# representative dataset through the float model and returns it with each activation's min/max recorded in its
# quantization parameters, unquantized; ``tensorflow.lite.python.convert.mlir_quantize`` then quantizes it (what
# ``convert()`` does next, and what ``tf.lite.experimental.QuantizationDebugger`` calls with a deny list).
# tests/convert/test_tflite_methods.py pins both, so a TensorFlow that changes them fails there first, by name.
CALIBRATE_ONLY_ATTR = "_experimental_calibrate_only"
MLIR_QUANTIZE_PARAMS = (
    "input_data_str",
    "disable_per_channel",
    "input_data_type",
    "output_data_type",
    "denylisted_nodes",
    "disable_per_channel_for_dense_layers",
)


def _api_changed(what: str) -> str:
    tf = lazy_import("tensorflow")
    return (
        f"TensorFlow {tf.__version__} changed the converter's private calibrate-only API ({what}); quantship's "
        "tflite-int8-<method> targets and the sensitivity fast path were written against TensorFlow 2.21"
    )


def check_private_api() -> None:
    """Fail loudly when the private converter API that calibrate-once / quantize-later needs is not there.

    Raises:
        ConversionError: Naming what changed.
    """

    lazy_import("tensorflow", purpose="TFLite conversion")
    try:
        from tensorflow.lite.python import convert as tfl_convert
        from tensorflow.lite.python import lite as tfl_lite
        from tensorflow.lite.tools import flatbuffer_utils
    except ImportError as exc:
        raise ConversionError(_api_changed(f"import failed: {exc}")) from None
    fn = getattr(tfl_convert, "mlir_quantize", None)
    if fn is None:
        raise ConversionError(_api_changed("tensorflow.lite.python.convert.mlir_quantize is gone"))
    params = inspect.signature(fn).parameters
    missing = [p for p in MLIR_QUANTIZE_PARAMS if p not in params]
    if missing:
        raise ConversionError(_api_changed(f"mlir_quantize lacks parameter(s) {missing}"))
    if CALIBRATE_ONLY_ATTR not in inspect.getsource(tfl_lite.TFLiteConverterBase._quantize):
        raise ConversionError(_api_changed(f"TFLiteConverterBase._quantize no longer reads {CALIBRATE_ONLY_ATTR}"))
    for name in ("convert_bytearray_to_object", "convert_object_to_bytearray"):
        if not hasattr(flatbuffer_utils, name):
            raise ConversionError(_api_changed(f"flatbuffer_utils.{name} is gone"))


def tensor_ranges(calibrated: bytes) -> dict[int, tuple[str, float, float]]:
    """Tensor index -> (name, min, max) of every tensor of the main subgraph with a recorded range."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(calibrated)
    out = {}
    for i, t in enumerate(model.subgraphs[0].tensors):
        q = t.quantization
        if q is not None and q.min is not None and q.max is not None and len(q.min) == 1:
            name = tensor_name(t)
            out[i] = (name, float(q.min[0]), float(q.max[0]))
    return out


def set_tensor_ranges(calibrated: bytes, ranges: dict[int, tuple[float, float]]) -> bytes:
    """Replace the recorded (min, max) of the given tensors of a calibrate-only model.

    Raises:
        ConversionError: A tensor index without a recorded range (not an activation of this model).
    """
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(calibrated)
    tensors = model.subgraphs[0].tensors
    for i, (lo, hi) in ranges.items():
        q = tensors[i].quantization if 0 <= i < len(tensors) else None
        if q is None or q.min is None or len(q.min) != 1:
            raise ConversionError(f"TFLite tensor {i} has no recorded range to replace")
        if not lo <= 0.0 <= hi or hi <= lo:
            raise ConversionError(f"range [{lo}, {hi}] of TFLite tensor {i} must hold 0 and be non-empty")
        q.min = np.array([lo], np.float32)
        q.max = np.array([hi], np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def tflite_tensor_layers(calibrated: bytes, model: Any) -> dict[int, str]:
    """Tensor index -> the Keras layer whose output the tensor holds, for every tensor with a recorded range.

    A fused op's output tensor is named ``a;b;c`` after the TensorFlow ops it absorbed, the last one first (a
    Conv2D + BatchNorm + ReLU6 is named after the ReLU6, whose output it is). The model input maps to the
    Keras input layer; tensors that name no layer (the softmax output, with its fixed int8 range) are left out.
    """
    names = {layer.name for layer in model.layers}
    input_layers = [layer.name for layer in model.layers if type(layer).__name__ == "InputLayer"]
    out = {}
    for i, (name, _, _) in tensor_ranges(calibrated).items():
        if name.startswith("serving_default_") and len(input_layers) == 1:
            out[i] = input_layers[0]
            continue
        layer = segment_layer(name.split(";")[0], names)
        if layer is not None:
            out[i] = keras_output_layer(model, layer)
    return out


@dataclass
class RangeReplacement:
    """Our ranges for the tensors of a calibrate-only TFLite model, and the tensors that keep the converter's.

    Attributes:
        ranges: Tensor index -> (min, max).
        kept: Names of tensors with a recorded range that keep it (no Keras layer, or no range of ours: the
            softmax output, whose int8 range TFLite fixes anyway).
    """

    ranges: dict[int, tuple[float, float]]
    kept: list[str]


def ranges_from_amax(
    calibrated: bytes, model: Any, layer_tensors: dict[str, str], amax: dict[str, float], minimum: dict[str, float]
) -> RangeReplacement:
    """Map our symmetric ranges onto the tensors of a calibrate-only model, through the Keras layer names.

    Args:
        calibrated: The calibrate-only flatbuffer.
        model: The Keras model it was converted from.
        layer_tensors: Keras layer -> the tensor of ours holding its output (e.g.
            :func:`quantship.convert.onnx.onnx_layer_outputs`).
        amax: Our calibrated |x| range per tensor.
        minimum: The smallest value seen per tensor: a tensor that is never negative (after ReLU / ReLU6) gets
            [0, amax] (all 256 int8 levels on its values), any other [-amax, amax].
    """
    layers = tflite_tensor_layers(calibrated, model)
    ranges, kept = {}, []
    for i, (name, _, _) in tensor_ranges(calibrated).items():
        tensor = layer_tensors.get(layers.get(i, ""))
        a = amax.get(tensor) if tensor is not None else None
        if a is None or a <= 0:
            kept.append(name)
            continue
        ranges[i] = (0.0, a) if minimum.get(tensor, -1.0) >= 0.0 else (-a, a)
    return RangeReplacement(ranges, kept)


def check_finite_for_calibration(model: Any, batches: Iterable[np.ndarray]) -> None:
    """Refuse, before the TFLite converter calibrates, a model whose weights or layer outputs on the calibration
    images hold NaN or inf: its own calibration records such ranges without a word (NaN outputs then score like a
    model) or crashes (weights of 1e38: a segmentation fault), where the statistics pass behind the ONNX Runtime and
    Q/DQ targets refuses them. Every int8 target is then treated alike.

    Raises:
        CalibrationError: Naming the layer (and the weight, or the calibration batch).
    """
    keras = lazy_import("keras", purpose="checking the model before calibration")
    for layer in model.layers:
        for w in layer.weights:
            if not np.isfinite(np.asarray(w)).all():
                raise CalibrationError(
                    f"layer '{layer.name}': weight '{w.name}' holds NaN or inf values; int8 ranges cannot be "
                    "calibrated from it (check the weights file)"
                )
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    names, outputs = [], []
    for layer in layers:
        for out in keras.tree.flatten(layer.output):
            names.append(layer.name)
            outputs.append(out)
    try:
        probe = keras.Model(model.inputs, outputs)
    except Exception:  # noqa: BLE001 - a model whose layers cannot be tapped: its outputs alone are checked
        probe, names = model, [layers[-1].name if layers else model.name]
    for k, batch in enumerate(batches, 1):
        with warnings.catch_warnings():  # Keras: a single array for a one-input model (the structure it expects)
            warnings.simplefilter("ignore", UserWarning)
            got = keras.tree.flatten(probe(batch, training=False))
        for name, value in zip(names, got):
            if not np.isfinite(np.asarray(value)).all():
                raise CalibrationError(
                    f"layer '{name}' outputs NaN or inf values in calibration batch {k} (weights too large, or not "
                    "numbers?); int8 ranges cannot be calibrated from them"
                )


def _representative(calibration: CalibrationFeed, seen: list[int]):
    def gen():
        for batch in calibration():
            arrays = list(batch.values()) if isinstance(batch, dict) else [batch]
            for i in range(arrays[0].shape[0]):
                item = [np.asarray(a[i : i + 1], dtype=np.float32) for a in arrays]
                if not all(np.isfinite(a).all() for a in item):
                    raise CalibrationError("calibration input holds NaN or inf values")
                seen[0] += 1
                yield item

    return gen


def convert_to_tflite(
    converter: TfliteConverter,
    spec: TfliteSpec,
    out_path: str | Path,
    calibration: CalibrationFeed | None = None,
    manifest: dict[str, Any] | None = None,
    reuse: bool = True,
) -> Artifact:
    """Convert and write ``out_path`` + its manifest atomically; reuse an identical earlier build.

    Args:
        converter: A :class:`TfliteConverter` holding the model.
        spec: Precision / I/O type.
        out_path: Where the ``.tflite`` goes.
        calibration: Representative data for int8 / int16x8.
        manifest: Facts to record (source model hash, calibration data hash, preprocessing, ...); also the
            key for reuse.
        reuse: Return the existing file when its manifest says it was built from the same inputs.
    """
    manifest = dict(manifest or {})
    manifest.update(
        {
            "format": "tflite",
            "precision": spec.precision.value,
            "io_dtype": spec.io_dtype.value,
            "float_layers": list(spec.float_layers),
        }
    )
    if not spec.needs_calibration:
        manifest.pop("calibration", None)
    build_key = sha256_json(manifest)
    if reuse:
        existing = load_reusable(out_path, build_key)
        if existing is not None:
            return existing
    data = converter.convert(spec, calibration)
    return write_artifact(out_path, data, {**manifest, "build_key": build_key})


def layer_nodes(tensors: Iterable[str], layer_names: set[str], layers: Iterable[str]) -> list[str]:
    """The names among ``tensors`` that belong to the given Keras layers (any of a fused name's ``;`` parts).

    Raises:
        ConfigError: A layer with no tensor.
    """
    wanted = set(layers)
    if not wanted:
        return []
    nodes = [n for n in tensors if any(segment_layer(part, layer_names) in wanted for part in n.split(";"))]
    missing = wanted - {segment_layer(part, layer_names) for n in nodes for part in n.split(";")}
    if missing:
        raise ConfigError(f"no TFLite op found for Keras layer(s) {sorted(missing)}")
    return nodes


def operator_kinds(model: Any) -> list[tuple[str, str]]:
    """(builtin operator name, output tensor name) of every operator of a TFLite model object
    (``flatbuffer_utils.convert_bytearray_to_object``), first subgraph, in execution order."""
    sg = model.subgraphs[0]
    return [(_op_kind(model, op), tensor_name(sg.tensors[i])) for op in sg.operators for i in op.outputs]


def tensor_name(tensor: Any) -> str:
    """A flatbuffer tensor object's name as text (the object API keeps it as bytes)."""
    n = tensor.name
    return n.decode() if isinstance(n, bytes) else str(n)


def _op_kind(model: Any, op: Any) -> str:
    """The builtin operator name of a flatbuffer operator object (``"CUSTOM"`` for any other)."""
    code = model.operatorCodes[op.opcodeIndex]
    return _builtin_names().get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")


# Ops that move values without arithmetic. Quantized next to a float op they add a rounding and nothing else (a
# float Conv after an int8 Pad reads its input rounded to int8: MobileNetV2's five Pads kept its TFLite model at
# 14.5 dB from fp32 with every other op in float), so a deny list takes them along with their neighbours.
MOVEMENT_OPS = frozenset({"PAD", "PADV2", "MIRROR_PAD", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE"})


def movement_neighbours(model: Any) -> dict[str, tuple[str, ...]]:
    """Each movement op's output tensor (:data:`MOVEMENT_OPS`) -> the op outputs whose float or int8 it takes: the
    outputs of the ops that read it or, when only the graph's output reads it, of the op that made its input.
    ``model``: a TFLite model object (``flatbuffer_utils.convert_bytearray_to_object``), first subgraph."""
    sg = model.subgraphs[0]

    def name(i: int) -> str:
        return tensor_name(sg.tensors[i])

    made: dict[int, Any] = {int(t): op for op in sg.operators for t in op.outputs}
    readers: dict[int, list[Any]] = {}
    for op in sg.operators:
        for t in op.inputs:
            if t >= 0:
                readers.setdefault(int(t), []).append(op)
    out: dict[str, tuple[str, ...]] = {}
    for op in sg.operators:
        if _op_kind(model, op) not in MOVEMENT_OPS:
            continue
        ops = [r for t in op.outputs for r in readers.get(int(t), [])]
        if not ops and len(op.inputs) and int(op.inputs[0]) in made:
            ops = [made[int(op.inputs[0])]]
        for t in op.outputs:
            out[name(int(t))] = tuple(dict.fromkeys(name(int(o)) for r in ops for o in r.outputs))
    return out


def follow_movement(nodes: Iterable[str], neighbours: dict[str, tuple[str, ...]]) -> list[str]:
    """``nodes`` (a deny list) with every movement op one of whose :func:`movement_neighbours` it keeps in float,
    transitively (a Reshape feeding a Pad feeding a float Conv)."""
    denied = list(dict.fromkeys(nodes))
    seen = set(denied)
    grew = True
    while grew:
        grew = False
        for op, near in neighbours.items():
            if op not in seen and any(n in seen for n in near):
                seen.add(op)
                denied.append(op)
                grew = True
    return denied


@functools.cache
def _builtin_names() -> dict[int, str]:
    """TFLite builtin operator code -> name (``25 -> "SOFTMAX"``), from the schema TensorFlow ships."""
    from tensorflow.lite.python import schema_py_generated as schema

    ops = schema.BuiltinOperator
    return {getattr(ops, k): k for k in dir(ops) if not k.startswith("_") and isinstance(getattr(ops, k), int)}
