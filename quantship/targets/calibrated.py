"""The build steps the calibrated targets share (Q/DQ ONNX, ONNX Runtime int8, TFLite with quantship's ranges,
TensorRT explicit int8): the float ONNX export, one statistics pass, the ranges of each method, and the
artifact written from them and reused when its manifest matches."""

from __future__ import annotations

from typing import Any, Callable

from quantship.calibrate.api import calibrate
from quantship.config import CalibrationMethod, TargetSpec
from quantship.convert.calibrated import collect_statistics
from quantship.convert.onnx import convert_to_onnx, onnx_layer_outputs
from quantship.fileio import sha256_json
from quantship.manifest import Artifact, load_reusable
from quantship.targets.base import BuildContext, get_target


def onnx_export(ctx: BuildContext, target: TargetSpec | None = None) -> Artifact:
    """The float ONNX export of the Keras model ``target`` converts (the plain model for onnx-fp32)."""

    spec = get_target("onnx-fp32").spec
    source = target or spec
    variant = ctx.variant(source)

    def export() -> Artifact:
        manifest = ctx.base_manifest(spec)
        if variant:  # the steps read the calibration images: they are part of what made this export
            manifest["post_training"] = ctx.base_manifest(source)["post_training"]
            manifest["post_training_calibration"] = dict(ctx.calibration.info) if ctx.calibration else {}
        path = ctx.artifact_path(spec, ".onnx", variant)
        return convert_to_onnx(ctx.keras_model(source), path, manifest=manifest, log_path=ctx.log_path)

    return ctx.shared(f"onnx-export{variant}", export)


def layer_outputs(ctx: BuildContext, spec: TargetSpec) -> dict[str, str]:
    """Keras layer -> the tensor of the ONNX export holding its output (how TFLite tensors find our ranges)."""

    def build() -> dict[str, str]:
        import onnx

        return onnx_layer_outputs(onnx.load(str(onnx_export(ctx, spec).path)), ctx.keras_model(spec))

    return ctx.shared(f"onnx-layer-outputs{ctx.variant(spec)}", build)


def calibration_percentile(ctx: BuildContext, spec: TargetSpec) -> float | None:
    """The percentile ``spec``'s ranges depend on (its method's, or one of ``auto``'s candidates'), for build keys."""
    uses = spec.calibration in (CalibrationMethod.PERCENTILE, CalibrationMethod.AUTO)
    return ctx.calibration.percentile if uses and ctx.calibration else None


def run_calibration(ctx: BuildContext, spec: TargetSpec) -> Any:
    """The run's calibration with ``spec``'s method. One statistics pass (on the ONNX export, observing the Q/DQ
    inputs and every Keras layer's output) serves every method and every backend of the run."""

    batches = ctx.calibration_batches(spec.name)
    fp32 = onnx_export(ctx, spec)
    v = ctx.variant(spec)
    collector = ctx.shared(
        f"onnx-stats{v}",
        lambda: collect_statistics(
            fp32.path,
            batches(),
            scope="qdq",
            threads=ctx.runner_options.threads,
            extra=layer_outputs(ctx, spec).values(),
        ),
    )
    percentile = ctx.calibration.percentile if ctx.calibration else None
    return ctx.shared(
        f"calibration-{spec.calibration.value}{v}", lambda: calibrate(collector, spec.calibration, percentile)
    )


def calibrated_build(
    ctx: BuildContext, spec: TargetSpec, suffix: str, fields: dict[str, Any], write: Callable[..., Any]
) -> Artifact:
    """An artifact written by ``write(calibration, fp32_path, path, manifest)`` from the run's calibration with
    ``spec``'s method; reused when its manifest (source export, method, percentile and ``fields``) matches."""

    fp32 = onnx_export(ctx, spec)
    path = ctx.artifact_path(spec, suffix)
    manifest = {
        **ctx.base_manifest(spec),
        "source_onnx_sha256": fp32.manifest["sha256"],
        "calibration_method": spec.calibration.value,
        "calibration_percentile": calibration_percentile(ctx, spec),
        **fields,
    }
    build_key = sha256_json(manifest)
    if (existing := load_reusable(path, build_key)) is None:
        write(run_calibration(ctx, spec), fp32.path, path, {**manifest, "build_key": build_key})
        existing = load_reusable(path, build_key)
    return existing
