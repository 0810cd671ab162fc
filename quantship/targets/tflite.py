"""TFLite targets: the converter's own precisions (``tflite-fp32`` ... ``tflite-int16x8``) and full-integer int8
with quantship's calibration (``tflite-int8-<method>``). Converter: :mod:`quantship.convert.tflite`; runner:
:mod:`quantship.runtime.tflite`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from quantship.config import CalibrationMethod, IODType, Precision, TargetSpec
from quantship.convert.artifact import write_artifact
from quantship.convert.layer_names import KerasLayers, tflite_tensor_layer
from quantship.convert.tflite import (
    TfliteConverter,
    TfliteSpec,
    check_finite_for_calibration,
    convert_to_tflite,
    ranges_from_amax,
)
from quantship.errors import CalibrationError
from quantship.manifest import Artifact
from quantship.runtime.tflite import TfliteRunner
from quantship.targets.base import BuildContext, Capture, LayerProbe, register_layer_probe, register_target
from quantship.targets.calibrated import calibrated_build, layer_outputs


def check_finite(ctx: BuildContext, spec: TargetSpec) -> None:
    """Weights and calibration outputs of the Keras model ``spec`` calibrates checked once per run (see
    :func:`~quantship.convert.tflite.check_finite_for_calibration`); the outcome, a refusal included, is shared."""

    def check() -> Exception | None:
        try:
            check_finite_for_calibration(ctx.keras_model(spec), ctx.calibration_batches(spec.name)())
        except CalibrationError as exc:
            return exc
        return None

    if (error := ctx.shared(f"finite-check{ctx.variant(spec)}", check)) is not None:
        raise CalibrationError(str(error))


def tflite_converter(ctx: BuildContext, spec: TargetSpec) -> Any:
    return ctx.shared(
        f"tflite-converter{ctx.variant(spec)}",
        lambda: TfliteConverter(ctx.keras_model(spec), ctx.log_path, work_dir=ctx.out_dir),
    )


def _tflite_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    converter = tflite_converter(ctx, spec)
    tspec = TfliteSpec(spec.precision, spec.io_dtype)
    if tspec.needs_calibration:
        check_finite(ctx, spec)
    calib = ctx.calibration_batches(spec.name) if tspec.needs_calibration else None
    return convert_to_tflite(converter, tspec, ctx.artifact_path(spec, ".tflite"), calib, ctx.base_manifest(spec))


for _name, _prec, _io, _desc in (
    ("tflite-fp32", Precision.FP32, IODType.FLOAT32, "TFLite float32"),
    ("tflite-fp16", Precision.FP16, IODType.FLOAT32, "TFLite float16 weights"),
    ("tflite-dynamic", Precision.DYNAMIC, IODType.FLOAT32, "TFLite dynamic range (int8 weights, float activations)"),
    ("tflite-int8", Precision.INT8, IODType.INT8, "TFLite full integer int8, int8 I/O"),
    ("tflite-int8-uint8io", Precision.INT8, IODType.UINT8, "TFLite full integer int8, uint8 I/O"),
    ("tflite-int8-floatio", Precision.INT8, IODType.FLOAT32, "TFLite full integer int8, float I/O"),
    ("tflite-int16x8", Precision.INT16X8, IODType.FLOAT32, "TFLite int16 activations, int8 weights"),
):
    register_target(TargetSpec(_name, "tflite", _prec, io_dtype=_io, description=_desc), _tflite_build)


def _tflite_method_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    """Full-integer TFLite with our calibrator's ranges: the converter calibrates only (its recorded min/max are
    replaced by ours, mapped through the Keras layer names), then quantizes."""

    converter = tflite_converter(ctx, spec)

    def write(result: Any, fp32: Path, path: Path, manifest: dict[str, Any]) -> None:
        check_finite(ctx, spec)  # the converter still calibrates (its ranges are then replaced by ours)
        batches = ctx.calibration_batches(spec.name)
        calibrated = ctx.shared(f"tflite-calibrated{ctx.variant(spec)}", lambda: converter.calibrate_only(batches))
        minimum = {name: s.min for name, s in result.stats.items()}
        replaced = ranges_from_amax(calibrated, ctx.keras_model(spec), layer_outputs(ctx, spec), result.amax, minimum)
        data = converter.quantize_calibrated(calibrated, spec.io_dtype, replaced.ranges)
        extra = {
            "calibrator": result.calibrator.describe(),
            "tensors_with_our_range": len(replaced.ranges),
            "tensors_with_converter_range": replaced.kept,
        }
        write_artifact(path, data, {**manifest, **extra})

    fields = {
        "format": "tflite",
        "precision": spec.precision.value,
        "io_dtype": spec.io_dtype.value,
        "ranges_from": "quantship statistics of the ONNX export, mapped to TFLite tensors by Keras layer",
    }
    return calibrated_build(ctx, spec, ".tflite", fields, write)


for _method in CalibrationMethod:
    register_target(
        TargetSpec(
            f"tflite-int8-{_method.value}",
            "tflite",
            Precision.INT8,
            calibration=_method,
            io_dtype=IODType.INT8,
            description=f"TFLite full integer int8, int8 I/O, ranges from quantship's {_method.value} calibration "
            "(the converter calibrates only; its min/max are replaced by ours)",
        ),
        _tflite_method_build,
    )


# ------------------------------------------------------------------------------------ diff: layer probe


class TfliteProbe(LayerProbe):
    """TFLite: the interpreter with every tensor kept (LiteRT's builtin kernels: a delegate computes its ops inside
    itself), quantized tensors dequantized with their own scale."""

    def __init__(self, name: str, path: Path, layers: KerasLayers, threads: int | None):
        self.name, self.layers = name, layers
        self.notes = ["LiteRT builtin kernels (intermediate tensors are not kept inside the XNNPACK delegate)"]
        self.tensors = {}
        self._runner = TfliteRunner(path, threads, name, preserve_all_tensors=True).activate()
        self._inputs = {m.name for m in self._runner.input_metadata()}
        self._outputs = [m.name for m in self._runner.output_metadata()]

    def run(self, x: np.ndarray) -> Capture:
        self._runner.infer(x)
        out: Capture = {}
        for name, value, step in self._runner.intermediate_tensors():
            if name in self._inputs:
                layer = self.layers.input_layer
            elif name in self._outputs and len(self._outputs) == len(self.layers.output_layers):
                layer = self.layers.output_layers[self._outputs.index(name)]  # renamed after the signature
            else:
                layer = tflite_tensor_layer(name, self.layers)
            if layer:  # the last tensor written for a layer holds its output
                out[layer] = (value, step)
                self.tensors[layer] = name
        return out

    def close(self) -> None:
        self._runner.deactivate()


register_layer_probe(
    "tflite",
    lambda target, artifact, loaded, layers, options: TfliteProbe(target.name, artifact.path, layers, options.threads),
)
