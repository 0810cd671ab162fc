"""TFLite targets: the converter's own precisions (``tflite-fp32`` ... ``tflite-int16x8``) and full-integer int8
with quantship's calibration (``tflite-int8-<method>``). Converter: :mod:`quantship.convert.tflite`; runner:
:mod:`quantship.runtime.tflite`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantship.config import CalibrationMethod, IODType, Precision, TargetSpec
from quantship.manifest import Artifact
from quantship.targets.base import BuildContext, register_target
from quantship.targets.calibrated import calibrated_build, layer_outputs


def tflite_converter(ctx: BuildContext, spec: TargetSpec) -> Any:
    from quantship.convert.tflite import TfliteConverter

    return ctx.shared(
        f"tflite-converter{ctx.variant(spec)}",
        lambda: TfliteConverter(ctx.keras_model(spec), ctx.log_path, work_dir=ctx.out_dir),
    )


def _tflite_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    from quantship.convert.tflite import TfliteSpec, convert_to_tflite

    converter = tflite_converter(ctx, spec)
    tspec = TfliteSpec(spec.precision, spec.io_dtype)
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
    from quantship.convert.tflite import ranges_from_amax
    from quantship.manifest import write_artifact

    converter = tflite_converter(ctx, spec)

    def write(result: Any, fp32: Path, path: Path, manifest: dict[str, Any]) -> None:
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
