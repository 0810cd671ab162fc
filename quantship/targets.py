"""Evaluation targets by name: how each one's artifact is built and which runner runs it.

A target is ``backend-precision`` (``tflite-int8``, ``keras-fp32``, ...). Adding a runtime means registering
its targets here; nothing else dispatches on target names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from quantship.config import Backend, IODType, Precision, TargetSpec
from quantship.convert.manifest import Artifact
from quantship.errors import ConfigError
from quantship.models.loading import LoadedModel
from quantship.runtime.base import Runner


@dataclass
class BuildContext:
    """What building artifacts and runners for one model needs; shared by all targets of a run."""

    loaded: LoadedModel
    out_dir: Path
    calibration_batches: Callable[[], list[np.ndarray]] | None = None
    calibration_info: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    log_path: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)  # backend options, e.g. trt_workspace_mb
    _cache: dict[str, Any] = field(default_factory=dict)

    def shared(self, key: str, factory: Callable[[], Any]) -> Any:
        """One object per run (e.g. the SavedModel export every TFLite precision converts from)."""
        if key not in self._cache:
            self._cache[key] = factory()
        return self._cache[key]

    def close(self) -> None:
        for obj in self._cache.values():
            close = getattr(obj, "close", None)
            if close:
                close()
        self._cache.clear()

    def base_manifest(self, target: TargetSpec) -> dict[str, Any]:
        lm = self.loaded
        return {
            "target": target.name,
            "backend": target.backend.value,
            "source_model": {"name": lm.name, "weights": lm.weights, "weights_sha256": lm.weights_hash},
            "preprocess": lm.preprocess.to_dict(),
            "preprocess_hash": lm.preprocess.hash(),
            "calibration": dict(self.calibration_info),
        }

    def artifact_path(self, target: TargetSpec, suffix: str) -> Path:
        return self.out_dir / "artifacts" / f"{self.loaded.name}-{target.name}{suffix}"


@dataclass(frozen=True)
class Target:
    spec: TargetSpec
    build: Callable[[BuildContext, TargetSpec], Artifact | None]
    make_runner: Callable[[BuildContext, TargetSpec, Artifact | None], Runner]

    @property
    def name(self) -> str:
        return self.spec.name


_TARGETS: dict[str, Target] = {}


def register_target(spec: TargetSpec, build, make_runner) -> None:
    if spec.name in _TARGETS:
        raise ValueError(f"target '{spec.name}' registered twice")
    _TARGETS[spec.name] = Target(spec, build, make_runner)


def get_target(name: str) -> Target:
    key = name.strip().lower()
    if key not in _TARGETS:
        raise ConfigError(f"unknown target '{name}'; known targets: {', '.join(_TARGETS)}")
    return _TARGETS[key]


def list_targets() -> list[Target]:
    return list(_TARGETS.values())


# ------------------------------------------------------------------------------------------ keras


def _keras_build(ctx: BuildContext, spec: TargetSpec) -> None:
    return None


def _keras_runner(ctx: BuildContext, spec: TargetSpec, artifact: Artifact | None) -> Runner:
    from quantship.runtime.keras import KerasRunner

    return KerasRunner(ctx.loaded.model, name=spec.name)


register_target(TargetSpec("keras-fp32", Backend.KERAS, Precision.FP32, description="Keras, float32 (reference)"), _keras_build, _keras_runner)

# ----------------------------------------------------------------------------------------- tflite


def _tflite_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    from quantship.convert.tflite import TfliteConverter, TfliteSpec, convert_to_tflite

    converter = ctx.shared("tflite-converter", lambda: TfliteConverter(ctx.loaded.model, ctx.log_path))
    tspec = TfliteSpec(spec.precision, spec.io_dtype)
    calib = ctx.calibration_batches if tspec.needs_calibration else None
    return convert_to_tflite(converter, tspec, ctx.artifact_path(spec, ".tflite"), calib, ctx.base_manifest(spec))


def _tflite_runner(ctx: BuildContext, spec: TargetSpec, artifact: Artifact | None) -> Runner:
    from quantship.runtime.tflite import TfliteRunner

    assert artifact is not None
    return TfliteRunner(artifact.path, num_threads=ctx.threads, name=spec.name)


for _name, _prec, _io, _desc in (
    ("tflite-fp32", Precision.FP32, IODType.FLOAT32, "TFLite float32"),
    ("tflite-fp16", Precision.FP16, IODType.FLOAT32, "TFLite float16 weights"),
    ("tflite-dynamic", Precision.DYNAMIC, IODType.FLOAT32, "TFLite dynamic range (int8 weights, float activations)"),
    ("tflite-int8", Precision.INT8, IODType.INT8, "TFLite full integer int8, int8 I/O"),
    ("tflite-int8-uint8io", Precision.INT8, IODType.UINT8, "TFLite full integer int8, uint8 I/O"),
    ("tflite-int8-floatio", Precision.INT8, IODType.FLOAT32, "TFLite full integer int8, float I/O"),
    ("tflite-int16x8", Precision.INT16X8, IODType.FLOAT32, "TFLite int16 activations, int8 weights"),
):
    register_target(TargetSpec(_name, Backend.TFLITE, _prec, io_dtype=_io, description=_desc), _tflite_build, _tflite_runner)

# ------------------------------------------------------------------------------------------- onnx


def _onnx_export(ctx: BuildContext) -> Artifact:
    from quantship.config import TargetSpec as _TS
    from quantship.convert.onnx import convert_to_onnx

    def export() -> Artifact:
        spec = _TS("onnx-fp32", Backend.ONNX, Precision.FP32)
        return convert_to_onnx(ctx.loaded.model, ctx.artifact_path(spec, ".onnx"), manifest=ctx.base_manifest(spec), log_path=ctx.log_path)

    return ctx.shared("onnx-export", export)


def _onnx_fp32_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    return _onnx_export(ctx)


def _onnx_int8_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    from quantship.calibrate.api import calibrate, collect_statistics, write_outputs
    from quantship.convert.manifest import load_reusable
    from quantship.fileio import sha256_json

    fp32 = _onnx_export(ctx)
    path = ctx.artifact_path(spec, ".onnx")
    manifest = {**ctx.base_manifest(spec), "source_onnx_sha256": fp32.manifest["sha256"], "calibration_method": spec.calibration}
    build_key = sha256_json(manifest)
    if (existing := load_reusable(path, build_key)) is not None:
        return existing
    if ctx.calibration_batches is None:
        raise ConfigError(f"{spec.name} needs calibration data")
    # One statistics pass serves every calibration method of the run.
    collector = ctx.shared("onnx-stats", lambda: collect_statistics(fp32.path, ctx.calibration_batches(), scope="qdq", threads=ctx.threads))
    result = calibrate(collector, spec.calibration)
    write_outputs(result, fp32.path, qdq=path, manifest={**manifest, "build_key": build_key})
    return load_reusable(path, build_key)


def _onnx_runner(ctx: BuildContext, spec: TargetSpec, artifact: Artifact | None) -> Runner:
    from quantship.runtime.onnxruntime import OnnxRunner

    assert artifact is not None
    return OnnxRunner(artifact.path, num_threads=ctx.threads, name=spec.name)


register_target(TargetSpec("onnx-fp32", Backend.ONNX, Precision.FP32, description="ONNX (tf2onnx) on ONNX Runtime, float32"), _onnx_fp32_build, _onnx_runner)
for _method in ("max", "entropy", "percentile", "mse"):
    register_target(
        TargetSpec(f"onnx-int8-{_method}", Backend.ONNX, Precision.INT8, calibration=_method, description=f"Q/DQ int8 ONNX (TensorRT placement), {_method} calibration, on ONNX Runtime CPU"),
        _onnx_int8_build,
        _onnx_runner,
    )

# --------------------------------------------------------------------------------------- tensorrt


def _trt_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    from quantship.convert.tensorrt import BatchProfile, EngineSpec, build_engine, import_tensorrt

    import_tensorrt()  # say so before exporting or calibrating anything
    opts = ctx.options
    precision = {Precision.FP32: "fp32", Precision.FP16: "fp16"}.get(spec.precision)
    if precision is None:
        precision = "int8-qdq" if spec.calibration == "qdq" else "int8"
    if precision == "int8-qdq":
        qdq_method = opts.get("trt_qdq_method", "entropy")
        source = _onnx_int8_build(ctx, TargetSpec(f"onnx-int8-{qdq_method}", Backend.ONNX, Precision.INT8, calibration=qdq_method))
    else:
        source = _onnx_export(ctx)
    cache = opts.get("trt_calibration_cache")
    if precision == "int8" and cache is None:
        cache = ctx.artifact_path(spec, ".cache")  # TensorRT writes it after calibrating; the next build reuses it
    engine_spec = EngineSpec(
        precision,
        calibration=spec.calibration if precision == "int8" else None,
        batch=BatchProfile.parse(opts.get("trt_batch", "1:8:32")),
        workspace_mb=int(opts.get("trt_workspace_mb", 2048)),
        timing_cache=Path(opts["trt_timing_cache"]) if opts.get("trt_timing_cache") else None,
        calibration_cache=Path(cache) if cache else None,
    )
    feed = ctx.calibration_batches() if (precision == "int8" and ctx.calibration_batches is not None) else None
    manifest = {**ctx.base_manifest(spec), "calibration_method": spec.calibration, "source_onnx_sha256": source.manifest["sha256"]}
    return build_engine(source.path, engine_spec, ctx.artifact_path(spec, ".engine"), feed, manifest)


def _trt_runner(ctx: BuildContext, spec: TargetSpec, artifact: Artifact | None) -> Runner:
    from quantship.runtime.tensorrt import TrtRunner

    assert artifact is not None
    return TrtRunner(artifact.path, name=spec.name, cuda_graph=bool(ctx.options.get("trt_cuda_graph")))


for _name, _prec, _cal, _desc in (
    ("trt-fp32", Precision.FP32, None, "TensorRT float32"),
    ("trt-fp16", Precision.FP16, None, "TensorRT float16 (TensorRT 10: builder flag; 11: fp16 ONNX, float32 I/O)"),
    ("trt-int8-entropy", Precision.INT8, "entropy", "TensorRT 10 implicit int8, IInt8EntropyCalibrator2"),
    ("trt-int8-max", Precision.INT8, "max", "TensorRT 10 implicit int8, IInt8MinMaxCalibrator"),
    ("trt-int8-qdq", Precision.INT8, "qdq", "TensorRT explicit int8 from the Q/DQ ONNX (10.x and 11.x)"),
):
    register_target(TargetSpec(_name, Backend.TENSORRT, _prec, calibration=_cal, description=_desc), _trt_build, _trt_runner)

DEFAULT_TARGETS = ("keras-fp32", "tflite-fp32", "tflite-fp16", "tflite-dynamic", "tflite-int8", "tflite-int16x8")
