"""TensorRT targets (``trt-fp32``, ``trt-fp16``, implicit ``trt-int8-entropy``/``-max``, explicit ``trt-int8-qdq``).
Everything TensorRT in quantship: engine build :mod:`quantship.convert.tensorrt`; calibrator classes
:mod:`quantship.calibrate.trt_calibrator`; cache I/O :mod:`quantship.calibrate.trt_cache`; runner
:mod:`quantship.runtime.tensorrt`; shared helpers :mod:`quantship.trt_util` and :mod:`quantship.cuda`."""

from __future__ import annotations

from quantship.calibrate.trt_cache import write_cache
from quantship.config import CalibrationMethod, Precision, TargetSpec, TrtInt8Mode
from quantship.convert.tensorrt import EngineSpec, build_engine
from quantship.fileio import sha256_json
from quantship.manifest import Artifact
from quantship.targets.base import DEFAULT_UNNAMED_METHOD, BuildContext, get_target, register_target
from quantship.targets.calibrated import onnx_export, run_calibration
from quantship.targets.onnx import qdq_build
from quantship.trt_util import import_tensorrt


def _trt_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    remote = ctx.engine_builder
    # Say so before exporting or calibrating anything: no TensorRT here (or on the device).
    version = remote.tensorrt_version if remote is not None else import_tensorrt().__version__
    opts = ctx.trt
    if spec.trt_int8 is TrtInt8Mode.EXPLICIT:
        method = opts.qdq_method or DEFAULT_UNNAMED_METHOD
        source = qdq_build(ctx, get_target(f"qdq-int8-{method.value}").spec)
    else:
        source = onnx_export(ctx, spec)
    implicit = spec.trt_int8 is TrtInt8Mode.IMPLICIT
    cache = opts.calibration_cache
    if implicit and cache is None:
        # TensorRT writes the cache after calibrating and reads it back on the next build: the file name carries
        # everything the scales depend on, so new weights, data, preprocessing or TensorRT never reuse old ones.
        key = sha256_json(
            {
                "weights": ctx.loaded.weights_hash,
                "calibration": ctx.calibration.info if ctx.calibration else None,
                "preprocess": ctx.loaded.preprocess.hash(),
                "method": spec.calibration.value if spec.calibration else None,
                "tensorrt": version,
                "post_training": ctx.ptq.describe() if ctx.uses_ptq(spec) else None,
            }
        )[:16]
        cache = ctx.artifact_path(spec, f".{key}.cache")
    engine_spec = EngineSpec(
        spec.precision,
        int8_mode=spec.trt_int8,
        calibration=spec.calibration if implicit else None,
        batch=opts.batch,
        workspace_mb=opts.workspace_mb,
        timing_cache=opts.timing_cache,
        calibration_cache=cache,
        calibration_batch=ctx.calibration.batch_size if ctx.calibration else 8,
    )
    manifest = {
        **ctx.base_manifest(spec),
        "calibration_method": spec.calibration.value if spec.calibration else None,
        "source_onnx_sha256": source.manifest["sha256"],
    }
    if remote is not None:
        if implicit and cache is not None and not cache.is_file():  # implicit: the cache path was set above
            # The device gets the host's calibration as a TensorRT cache: the images never leave this machine.
            write_cache(cache, run_calibration(ctx, spec).trt_cache(version))
        return remote.build_engine(source.path, engine_spec, ctx.artifact_path(spec, ".engine"), None, manifest)
    feed = ctx.calibration.batches() if (implicit and ctx.calibration is not None) else None
    return build_engine(source.path, engine_spec, ctx.artifact_path(spec, ".engine"), feed, manifest)


for _name, _prec, _mode, _cal, _desc in (
    ("trt-fp32", Precision.FP32, None, None, "TensorRT float32"),
    (
        "trt-fp16",
        Precision.FP16,
        None,
        None,
        "TensorRT float16 (TensorRT 10: builder flag; 11: fp16 ONNX, float32 I/O)",
    ),
    (
        "trt-int8-entropy",
        Precision.INT8,
        TrtInt8Mode.IMPLICIT,
        CalibrationMethod.ENTROPY,
        "TensorRT 10 implicit int8, IInt8EntropyCalibrator2",
    ),
    (
        "trt-int8-max",
        Precision.INT8,
        TrtInt8Mode.IMPLICIT,
        CalibrationMethod.MAX,
        "TensorRT 10 implicit int8, IInt8MinMaxCalibrator",
    ),
    (
        "trt-int8-qdq",
        Precision.INT8,
        TrtInt8Mode.EXPLICIT,
        None,
        "TensorRT explicit int8 from the Q/DQ ONNX (10.x and 11.x)",
    ),
):
    register_target(TargetSpec(_name, "trt", _prec, calibration=_cal, trt_int8=_mode, description=_desc), _trt_build)
