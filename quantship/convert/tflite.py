"""Keras -> TFLite at every precision: fp32, fp16, dynamic-range, full-integer int8, int16x8.

The Keras model is exported once to a SavedModel (the converter is about twice as fast from it as from a
live Keras model) and each precision is converted from that export. The converter's own console output
(hundreds of lines per call) goes to a log file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from quantship.config import IODType, Precision
from quantship.errors import CalibrationError, ConfigError, ConversionError
from quantship.fileio import make_temp_dir, remove_temp_dir, sha256_json
from quantship.lazy import lazy_import
from quantship.logs import redirect_native_output
from quantship.manifest import Artifact, load_reusable, write_artifact

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

    def __post_init__(self) -> None:
        if self.precision not in TFLITE_PRECISIONS:
            raise ConfigError(f"TFLite has no precision '{self.precision.value}'")
        if self.io_dtype is not IODType.FLOAT32 and self.precision is not Precision.INT8:
            raise ConfigError(f"integer I/O ({self.io_dtype.value}) applies to full-integer int8 only")
        if self.float_layers and (self.precision is not Precision.INT8 or self.io_dtype is not IODType.FLOAT32):
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
        if spec.float_layers:
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
        """Output tensor names of the float model's ops (what the quantization debugger's denylist takes)."""
        if getattr(self, "_op_names", None) is None:
            litert = lazy_import("ai_edge_litert.interpreter", "ai-edge-litert")
            data = self.convert(TfliteSpec(Precision.FP32))
            interp = litert.Interpreter(model_content=data)
            self._op_names = [d["name"] for d in interp.get_tensor_details()]
        return self._op_names

    def _convert_with_denylist(
        self, conv: Any, spec: TfliteSpec, calibration: CalibrationFeed, seen: list[int]
    ) -> bytes:
        """int8 with the given Keras layers kept in float, via the converter's quantization debugger."""
        from quantship.convert.onnx import _segment_layer

        tf = lazy_import("tensorflow")
        layer_names = {layer.name for layer in self.model.layers}
        wanted = set(spec.float_layers)
        nodes = [
            n
            for n in self.float_model_tensor_names()
            if any(_segment_layer(part, layer_names) in wanted for part in n.split(";"))
        ]
        missing = wanted - {_segment_layer(part, layer_names) for n in nodes for part in n.split(";")}
        if missing:
            raise ConfigError(f"no TFLite op found for Keras layer(s) {sorted(missing)}")
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

    def _failure(self, spec: TfliteSpec, exc: Exception) -> ConversionError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"; converter log: {self.log_path}" if self.log_path else ""
        return ConversionError(f"TFLite {spec.precision.value} conversion failed: {first}{where}")


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
