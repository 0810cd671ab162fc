"""Evaluation targets by name: how each one's artifact is built; its runner comes from the runtime registry.

A target is ``backend-precision[-method]`` (``tflite-int8``, ``keras-fp32``, ``qdq-int8-entropy``). This
module sits below the jobs and above the converters, calibrators and runtimes: it is the only place that
knows which converter makes which target, and :func:`parse_targets` is the only place target names are
parsed. Adding a runtime means registering the runtime (``quantship.runtime.registry``) and its targets
here (or from any module, with :func:`register_target`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from quantship.config import CalibrationMethod, IODType, Precision, PtqSteps, TargetSpec, TrtInt8Mode, TrtOptions
from quantship.errors import ConfigError
from quantship.lazy import lazy_import
from quantship.manifest import Artifact
from quantship.models.loading import LoadedModel
from quantship.runtime.base import Runner, RunnerOptions
from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT
from quantship.runtime.registry import get_runtime


@dataclass
class CalibrationData:
    """The calibration batches of a run (a callable, so they are decoded only when a target needs them), what
    identifies them in manifests (count, data hash, source), the percentile of the percentile method and the
    batch size of TensorRT's calibrator."""

    batches: Callable[[], list[np.ndarray]]
    info: dict[str, Any]
    percentile: float | None = None
    batch_size: int = 8


@dataclass
class BuildContext:
    """What building artifacts and runners for one model needs; shared by all targets of a run."""

    loaded: LoadedModel
    out_dir: Path
    calibration: CalibrationData | None = None
    runner_options: RunnerOptions = field(default_factory=RunnerOptions)
    trt: TrtOptions = field(default_factory=TrtOptions)
    log_path: Path | None = None
    ptq: PtqSteps = field(default_factory=PtqSteps)
    _cache: dict[str, Any] = field(default_factory=dict)

    def uses_ptq(self, spec: TargetSpec) -> bool:
        """Whether ``spec`` is built from the model with the post-training steps (targets with int8 weights).
        With ``auto`` this context applies none: the search (:mod:`quantship.jobs.post_training`) builds each
        candidate in a context of its own."""
        return self.ptq.active and not self.ptq.auto and spec.precision in QUANTIZED_WEIGHTS

    def keras_model(self, spec: TargetSpec) -> Any:
        """The Keras model ``spec`` converts: with the post-training steps applied (once per run) for targets with
        int8 weights; the loaded model itself otherwise (it stays the fp32 reference)."""
        if not self.uses_ptq(spec):
            return self.loaded.model
        return self._prepared()[0]

    def adaround_store(self) -> Any:
        """Where AdaRound's integers for this run's build key are kept: the model's weights, preprocessing,
        calibration images, the steps before it and its budget, the TensorFlow version."""
        from quantship.convert.adaround import CACHE_FORMAT, AdaRoundStore
        from quantship.fileio import sha256_json

        tf = lazy_import("tensorflow")
        key = sha256_json(
            {
                "weights": self.loaded.weights_hash,
                "model": self.loaded.name,
                "preprocess": self.loaded.preprocess.hash(),
                "calibration": self.calibration.info if self.calibration else None,
                "steps": self.ptq.describe(),
                "tensorflow": tf.__version__,
                "format": CACHE_FORMAT,
            }
        )[:16]
        return AdaRoundStore(self.out_dir / "artifacts" / f"{self.loaded.name}-adaround-{key}.npz")

    def _prepared(self) -> tuple[Any, Any]:
        def build() -> tuple[Any, Any]:
            from quantship.convert.ptq import prepare_model

            batches = self.calibration.batches if self.calibration else None
            store = self.adaround_store() if self.ptq.adaround is not None else None
            return prepare_model(self.loaded.model, self.ptq, batches, store)

        return self.shared("ptq-model", build)

    def variant(self, spec: TargetSpec) -> str:
        """Key suffix of what is shared between targets built from the same Keras model."""
        return f"+{self.ptq.label}" if self.uses_ptq(spec) else ""

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

    def calibration_batches(self, target: str) -> Callable[[], list[np.ndarray]]:
        if self.calibration is None:
            raise ConfigError(f"{target} needs calibration data")
        return self.calibration.batches

    def base_manifest(self, target: TargetSpec) -> dict[str, Any]:
        lm = self.loaded
        return {
            "target": target.name,
            "backend": target.backend,
            "source_model": {"name": lm.name, "weights": lm.weights, "weights_sha256": lm.weights_hash},
            "preprocess": lm.preprocess.to_dict(),
            "preprocess_hash": lm.preprocess.hash(),
            "calibration": dict(self.calibration.info) if self.calibration else {},
            **({"post_training": self._prepared()[1].to_dict()} if self.uses_ptq(target) else {}),
        }

    def artifact_path(self, target: TargetSpec, suffix: str, variant: str | None = None) -> Path:
        v = self.variant(target) if variant is None else variant
        return self.out_dir / "artifacts" / f"{self.loaded.name}-{target.name}{v}{suffix}"


# Precisions with int8 weights: what the post-training steps (equalization, bias correction) are for.
QUANTIZED_WEIGHTS = (Precision.INT8, Precision.INT16X8, Precision.DYNAMIC)


@dataclass(frozen=True)
class Target:
    """A named target: its spec and how its artifact is built (None for in-memory runtimes).

    Attributes:
        session_config: Runtime session settings this target always runs with (merged into the run's
            :class:`RunnerOptions`).
    """

    spec: TargetSpec
    build: Callable[[BuildContext, TargetSpec], Artifact | None]
    session_config: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    def runner_options(self, ctx: BuildContext) -> RunnerOptions:
        return dataclasses.replace(
            ctx.runner_options, session_config=ctx.runner_options.session_config + self.session_config
        )

    def make_runner(self, ctx: BuildContext, artifact: Artifact | None) -> Runner:
        """The runner of this target's artifact (or of the in-memory model), from the runtime registry."""
        source = artifact.path if artifact is not None else ctx.loaded.model
        return get_runtime(self.spec.backend).make_runner(source, self.runner_options(ctx), self.spec.name)


_TARGETS: dict[str, Target] = {}
_ALIASES: dict[str, str] = {}  # old or alternative name -> canonical name


def register_alias(alias: str, canonical: str) -> None:
    """Accept ``alias`` wherever target names are parsed; rows, keys and manifests use ``canonical``."""
    _ALIASES[alias] = canonical


def register_target(
    spec: TargetSpec,
    build: Callable[[BuildContext, TargetSpec], Artifact | None],
    session_config: Iterable[tuple[str, str]] = (),
) -> Target:
    """Add a target (names are unique; its backend must be a registered runtime)."""
    if spec.name in _TARGETS:
        raise ValueError(f"target '{spec.name}' registered twice")
    get_runtime(spec.backend)
    target = Target(spec, build, tuple(session_config))
    _TARGETS[spec.name] = target
    return target


def unregister_target(name: str) -> None:
    """Remove a target (a plug-in's or a test's)."""
    _TARGETS.pop(name, None)


def get_target(name: str) -> Target:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _TARGETS:
        raise ConfigError(f"unknown target '{name}'{_suffix_hint(key)}; known targets: {', '.join(_TARGETS)}")
    return _TARGETS[key]


IO_SUFFIXES = ("uint8io", "floatio")  # I/O variants of tflite-int8; any other suffix of a target is a method


def _suffix_hint(key: str) -> str:
    """For ``base-<suffix>``: what suffixes ``base`` takes (calibration methods, I/O types)."""
    base, _, suffix = key.rpartition("-")
    methods = [m.value for m in CalibrationMethod if f"{base}-{m.value}" in _TARGETS]
    ios = [s for s in IO_SUFFIXES if f"{base}-{s}" in _TARGETS]
    if not (methods or ios):
        return ""
    return (
        f" ('{suffix}' is neither a calibration method of {base} ({', '.join(methods) or 'none'}) nor an I/O type "
        f"({', '.join(ios) or 'none'}))"
    )


def parse_targets(names: str | Iterable[str], option: str = "--targets") -> list[Target]:
    """Targets from a comma-separated string or a list of names, in order, without repeats.

    Raises:
        ConfigError: No name at all, or an unknown name.
    """
    items = names.split(",") if isinstance(names, str) else list(names)
    if not all(isinstance(n, str) for n in items):
        raise ConfigError(f"{option}: target names must be strings, got {items!r}")
    out: list[Target] = []
    for n in items:
        if n.strip():
            t = get_target(n)
            if t not in out:
                out.append(t)
    if not out:
        raise ConfigError(f"{option}: no target given; see 'quantship targets'")
    return out


def list_targets() -> list[Target]:
    return list(_TARGETS.values())


# ------------------------------------------------------------------------------------------ keras


def _in_memory(ctx: BuildContext, spec: TargetSpec) -> None:
    return None


register_target(TargetSpec("keras-fp32", "keras", Precision.FP32, description="Keras, float32 (reference)"), _in_memory)

# ----------------------------------------------------------------------------------------- tflite


def _tflite_converter(ctx: BuildContext, spec: TargetSpec) -> Any:
    from quantship.convert.tflite import TfliteConverter

    return ctx.shared(
        f"tflite-converter{ctx.variant(spec)}",
        lambda: TfliteConverter(ctx.keras_model(spec), ctx.log_path, work_dir=ctx.out_dir),
    )


def _tflite_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    from quantship.convert.tflite import TfliteSpec, convert_to_tflite

    converter = _tflite_converter(ctx, spec)
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

# ------------------------------------------------------------------------------------------- onnx


def _onnx_export(ctx: BuildContext, target: TargetSpec | None = None) -> Artifact:
    """The float ONNX export of the Keras model ``target`` converts (the plain model for onnx-fp32)."""
    from quantship.convert.onnx import convert_to_onnx

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


def _onnx_fp32_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    return _onnx_export(ctx)


def _layer_outputs(ctx: BuildContext, spec: TargetSpec) -> dict[str, str]:
    """Keras layer -> the tensor of the ONNX export holding its output (how TFLite tensors find our ranges)."""

    def build() -> dict[str, str]:
        import onnx

        from quantship.convert.onnx import onnx_layer_outputs

        return onnx_layer_outputs(onnx.load(str(_onnx_export(ctx, spec).path)), ctx.keras_model(spec))

    return ctx.shared(f"onnx-layer-outputs{ctx.variant(spec)}", build)


def _percentile(ctx: BuildContext, spec: TargetSpec) -> float | None:
    """The percentile ``spec``'s ranges depend on (its method's, or one of ``auto``'s candidates'), for build keys."""
    uses = spec.calibration in (CalibrationMethod.PERCENTILE, CalibrationMethod.AUTO)
    return ctx.calibration.percentile if uses and ctx.calibration else None


def _calibration(ctx: BuildContext, spec: TargetSpec) -> Any:
    """The run's calibration with ``spec``'s method. One statistics pass (on the ONNX export, observing the Q/DQ
    inputs and every Keras layer's output) serves every method and every backend of the run."""
    from quantship.calibrate.api import calibrate, collect_statistics

    batches = ctx.calibration_batches(spec.name)
    fp32 = _onnx_export(ctx, spec)
    v = ctx.variant(spec)
    collector = ctx.shared(
        f"onnx-stats{v}",
        lambda: collect_statistics(
            fp32.path,
            batches(),
            scope="qdq",
            threads=ctx.runner_options.threads,
            extra=_layer_outputs(ctx, spec).values(),
        ),
    )
    percentile = ctx.calibration.percentile if ctx.calibration else None
    return ctx.shared(
        f"calibration-{spec.calibration.value}{v}", lambda: calibrate(collector, spec.calibration, percentile)
    )


def _calibrated_build(
    ctx: BuildContext, spec: TargetSpec, suffix: str, fields: dict[str, Any], write: Callable[..., Any]
) -> Artifact:
    """An artifact written by ``write(calibration, fp32_path, path, manifest)`` from the run's calibration with
    ``spec``'s method; reused when its manifest (source export, method, percentile and ``fields``) matches."""
    from quantship.fileio import sha256_json
    from quantship.manifest import load_reusable

    fp32 = _onnx_export(ctx, spec)
    path = ctx.artifact_path(spec, suffix)
    manifest = {
        **ctx.base_manifest(spec),
        "source_onnx_sha256": fp32.manifest["sha256"],
        "calibration_method": spec.calibration.value,
        "calibration_percentile": _percentile(ctx, spec),
        **fields,
    }
    build_key = sha256_json(manifest)
    if (existing := load_reusable(path, build_key)) is None:
        write(_calibration(ctx, spec), fp32.path, path, {**manifest, "build_key": build_key})
        existing = load_reusable(path, build_key)
    return existing


def _qdq_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    from quantship.calibrate.api import write_outputs

    fields = {
        "runtime_session_config": dict(get_target(spec.name).session_config),
        "qdq_placement": "residual-skip-quantized",  # NVIDIA's residual-Add rule (issue 12): older files differ
    }
    return _calibrated_build(
        ctx,
        spec,
        ".onnx",
        fields,
        lambda result, fp32, path, manifest: write_outputs(result, fp32, qdq=path, manifest=manifest),
    )


def _tflite_method_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    """Full-integer TFLite with our calibrator's ranges: the converter calibrates only (its recorded min/max are
    replaced by ours, mapped through the Keras layer names), then quantizes."""
    from quantship.convert.tflite import ranges_from_amax
    from quantship.manifest import write_artifact

    converter = _tflite_converter(ctx, spec)

    def write(result: Any, fp32: Path, path: Path, manifest: dict[str, Any]) -> None:
        batches = ctx.calibration_batches(spec.name)
        calibrated = ctx.shared(f"tflite-calibrated{ctx.variant(spec)}", lambda: converter.calibrate_only(batches))
        minimum = {name: s.min for name, s in result.stats.items()}
        replaced = ranges_from_amax(calibrated, ctx.keras_model(spec), _layer_outputs(ctx, spec), result.amax, minimum)
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
    return _calibrated_build(ctx, spec, ".tflite", fields, write)


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

register_target(
    TargetSpec("onnx-fp32", "onnx", Precision.FP32, description="ONNX (tf2onnx) on ONNX Runtime, float32"),
    _onnx_fp32_build,
)
for _method in CalibrationMethod:
    _qdq = register_target(
        TargetSpec(
            f"qdq-int8-{_method.value}",
            "onnx",
            Precision.INT8,
            calibration=_method,
            description=f"Q/DQ int8 ONNX (TensorRT placement), {_method.value} calibration, run as fake-quant on ONNX "
            "Runtime CPU: the int8 accuracy TensorRT will get",
        ),
        _qdq_build,
        session_config=QDQ_FAKE_QUANT,
    )
    register_alias(f"onnx-int8-{_method.value}", _qdq.name)


def _ort_int8_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    from quantship.calibrate.api import write_ort_model

    # ORT's default session options (what a user's own application opens the file with); the same statistics pass
    # as the Q/DQ targets (it observes the tensors of both layouts).
    return _calibrated_build(ctx, spec, ".onnx", {"runtime_session_config": {}, "layout_version": 1}, write_ort_model)


for _method in CalibrationMethod:
    register_target(
        TargetSpec(
            f"ort-int8-{_method.value}",
            "onnx",
            Precision.INT8,
            calibration=_method,
            description=f"int8 ONNX laid out for ONNX Runtime's fused CPU kernels (QLinearConv, uint8 activations), "
            f"{_method.value} calibration, at ORT's default session options: for CPU deployment",
        ),
        _ort_int8_build,
    )

# --------------------------------------------------------------------------------------- tensorrt


def _trt_build(ctx: BuildContext, spec: TargetSpec) -> Artifact:
    from quantship.convert.tensorrt import EngineSpec, build_engine
    from quantship.fileio import sha256_json
    from quantship.trt_util import import_tensorrt

    trt = import_tensorrt()  # say so before exporting or calibrating anything
    opts = ctx.trt
    if spec.trt_int8 is TrtInt8Mode.EXPLICIT:
        method = opts.qdq_method or DEFAULT_UNNAMED_METHOD
        source = _qdq_build(ctx, get_target(f"qdq-int8-{method.value}").spec)
    else:
        source = _onnx_export(ctx, spec)
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
                "method": spec.calibration.value,
                "tensorrt": trt.__version__,
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
    feed = ctx.calibration.batches() if (implicit and ctx.calibration is not None) else None
    manifest = {
        **ctx.base_manifest(spec),
        "calibration_method": spec.calibration.value if spec.calibration else None,
        "source_onnx_sha256": source.manifest["sha256"],
    }
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

DEFAULT_TARGETS = ("keras-fp32", "tflite-fp32", "tflite-fp16", "tflite-dynamic", "tflite-int8", "tflite-int16x8")


DEFAULT_UNNAMED_METHOD = CalibrationMethod.ENTROPY


def needs_calibration(
    targets: Iterable[Target], trt: TrtOptions = TrtOptions(), ptq: PtqSteps = PtqSteps()
) -> list[Target]:
    """The targets that need calibration images (implicit TensorRT int8 can read its ranges from a given
    calibration cache instead; post-training steps need them for every target with int8 weights)."""
    return [
        t
        for t in targets
        if (t.spec.needs_calibration and not (t.spec.trt_int8 is TrtInt8Mode.IMPLICIT and trt.calibration_cache))
        or (ptq.active and t.spec.precision in QUANTIZED_WEIGHTS)
    ]
