"""ONNX -> TensorRT engine, for TensorRT 10.x (weakly typed: precision flags, implicit int8 calibration) and
TensorRT 11.x (strongly typed only: int8 from Q/DQ nodes, fp16 from fp16 tensors).

What can be decided without TensorRT is kept in pure functions (version parsing, the build plan, calibration
batching, cache ranges, manifest checks, buffer sizing) and tested everywhere; the rest calls TensorRT's
documented Python API and runs where TensorRT and a GPU are present (``scripts/trt_smoke.sh``).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from quantship.calibrate.feed import FixedBatches
from quantship.calibrate.trt_cache import CalibrationCache, read_cache
from quantship.calibrate.trt_calibrator import TRT_CALIBRATORS, make_calibrator
from quantship.config import BatchProfile, CalibrationMethod, Precision, TrtInt8Mode, parse_choice
from quantship.convert.artifact import write_artifact
from quantship.errors import ConfigError, ConversionError
from quantship.fileio import sha256_json, write_bytes_atomic
from quantship.manifest import Artifact, load_reusable
from quantship.trt_util import TrtVersion, engine_environment, import_tensorrt, make_logger

if TYPE_CHECKING:  # the TensorRT stubs type these (scripts/typecheck.sh); never imported at run time
    import tensorrt

log = logging.getLogger("quantship.tensorrt")

ENGINE_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.INT8)


@dataclass(frozen=True)
class EngineSpec:
    """What engine to build.

    Attributes:
        precision: fp32, fp16 or int8.
        int8_mode: For int8: implicit (TensorRT's calibrator; TensorRT 10 only) or explicit (from a Q/DQ ONNX
            model).
        calibration: For implicit int8: entropy or max.
        batch: Optimization profile of the batch dimension.
        workspace_mb: Builder workspace memory pool limit.
        timing_cache: File to load the timing cache from and save it back to.
        calibration_cache: TensorRT calibration cache: read when present (TensorRT 10 then skips the
            calibration pass), written after calibration. Without calibration data, an existing cache (e.g.
            from ``quantship calibrate --cache``) gives the int8 ranges.
        calibration_batch: Batch size of the calibrator.
    """

    precision: Precision
    int8_mode: TrtInt8Mode | None = None
    calibration: CalibrationMethod | None = None
    batch: BatchProfile = field(default_factory=BatchProfile)
    workspace_mb: int = 2048
    timing_cache: Path | None = None
    calibration_cache: Path | None = None
    calibration_batch: int = 8

    def __post_init__(self) -> None:
        precision = parse_choice(Precision, self.precision, "TensorRT precision")
        if precision not in ENGINE_PRECISIONS:
            raise ConfigError(
                f"unknown TensorRT precision '{precision.value}'; choose one of: "
                f"{', '.join(p.value for p in ENGINE_PRECISIONS)}"
            )
        object.__setattr__(self, "precision", precision)
        if self.int8_mode is not None:
            object.__setattr__(self, "int8_mode", parse_choice(TrtInt8Mode, self.int8_mode, "TensorRT int8 mode"))
        if self.calibration is not None:
            object.__setattr__(self, "calibration", CalibrationMethod.parse(self.calibration))
        if precision is Precision.INT8 and self.int8_mode is None:
            raise ConfigError("TensorRT int8 needs a mode: implicit (TensorRT's calibrator) or explicit (Q/DQ model)")
        if self.int8_mode is TrtInt8Mode.IMPLICIT and self.calibration not in TRT_CALIBRATORS:
            method = self.calibration.value if self.calibration else None
            raise ConfigError(
                f"implicit int8 calibration in TensorRT is 'entropy' or 'max', got '{method}'; other methods "
                "go through the Q/DQ model (explicit int8, target trt-int8-qdq)"
            )
        if self.workspace_mb <= 0 or self.calibration_batch <= 0:
            raise ConfigError("workspace and calibration batch must be positive")

    @property
    def implicit_method(self) -> CalibrationMethod:
        """The calibrator of implicit int8 (entropy or max: checked above)."""
        if self.calibration is None:
            raise ConfigError("implicit int8 calibration in TensorRT needs a method: 'entropy' or 'max'")
        return self.calibration

    @property
    def implicit_int8(self) -> bool:
        return self.precision is Precision.INT8 and self.int8_mode is TrtInt8Mode.IMPLICIT

    @property
    def explicit_int8(self) -> bool:
        return self.precision is Precision.INT8 and self.int8_mode is TrtInt8Mode.EXPLICIT

    @property
    def label(self) -> str:
        return "int8-qdq" if self.explicit_int8 else self.precision.value


@dataclass(frozen=True)
class BuildPlan:
    """How a spec is realised on a given TensorRT version (flags by enum member name)."""

    version: TrtVersion
    network_flags: tuple[str, ...]
    builder_flags: tuple[str, ...]
    onnx_input: str  # "fp32", "fp16" (converted, float32 I/O kept) or "qdq"
    int8_source: str | None  # "calibrator", "cache-ranges" or None
    calibrator: str | None = None  # "IInt8EntropyCalibrator2" / "IInt8MinMaxCalibrator"


def plan_build(spec: EngineSpec, version: TrtVersion, have_data: bool, cache_available: bool) -> BuildPlan:
    """Decide flags and inputs for ``spec`` on ``version``.

    Raises:
        ConfigError: Unsupported TensorRT generation, implicit int8 on TensorRT 11, or int8 without any
            source of ranges.
    """
    if not version.supported:
        raise ConfigError(f"TensorRT {version} is not supported; quantship targets TensorRT 10.x and 11.x")
    onnx_input = "qdq" if spec.explicit_int8 else spec.precision.value
    if version.strongly_typed_only:
        if spec.implicit_int8:
            raise ConfigError(
                f"TensorRT {version} has no implicit int8 calibration (calibrators, BuilderFlag.INT8 and "
                "int8_calibrator were removed in TensorRT 11). Build from a Q/DQ ONNX model instead: target "
                "trt-int8-qdq, or 'quantship calibrate --qdq model-qdq.onnx' and build that model"
            )
        return BuildPlan(version, ("STRONGLY_TYPED",), (), onnx_input, None)
    # TensorRT 10: weakly typed network, precision through builder flags; the ONNX stays float32.
    flags = {Precision.FP32: (), Precision.FP16: ("FP16",), Precision.INT8: ("INT8",)}[spec.precision]
    if not spec.implicit_int8:
        return BuildPlan(version, (), flags, "fp32" if onnx_input == "fp16" else onnx_input, None)
    if have_data:
        return BuildPlan(version, (), flags, "fp32", "calibrator", TRT_CALIBRATORS[spec.implicit_method])
    if cache_available:
        return BuildPlan(version, (), flags, "fp32", "cache-ranges")
    raise ConfigError("implicit int8 needs calibration data or an existing calibration cache (--trt-calib-cache)")


def cache_ranges(tensor_names: Iterable[str], cache: CalibrationCache) -> tuple[dict[str, float], list[str]]:
    """Dynamic range (scale * 127) for each network tensor found in the cache, and the tensors missing."""
    ranges, missing = {}, []
    for name in tensor_names:
        if name in cache.scales:
            ranges[name] = cache.scales[name] * 127.0
        else:
            missing.append(name)
    return ranges, missing


def onnx_fp16(onnx_path: Path, out_path: Path) -> Path:
    """An fp16 copy of an ONNX model with float32 inputs/outputs (for strongly typed TensorRT 11)."""
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return out_path


def _parse_onnx(network: tensorrt.INetworkDefinition, logger: tensorrt.ILogger, path: Path) -> None:
    trt = import_tensorrt()
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            node = err.node_name() if hasattr(err, "node_name") else f"#{err.node()}"
            op = err.node_operator() if hasattr(err, "node_operator") else "?"
            errors.append(f"node '{node}' (op {op}): {err.desc()}")
        raise ConversionError(f"TensorRT's ONNX parser rejected {path.name}: " + "; ".join(errors or ["unknown error"]))


def build_engine(
    onnx_path: str | Path,
    spec: EngineSpec,
    out_path: str | Path,
    calibration_feed: Iterable | None = None,
    manifest: dict[str, Any] | None = None,
    reuse: bool = True,
) -> Artifact:
    """Build a serialized engine from an ONNX model (a Q/DQ model for explicit int8) and write it with its
    manifest (TensorRT version, GPU and compute capability, precision, calibration method and data hash).

    Raises:
        MissingDependencyError: No TensorRT or no cuda-python.
        RuntimeBackendError: No GPU, or a CUDA driver/runtime mismatch.
        ConfigError: The spec does not fit this TensorRT generation.
        ConversionError: The parser rejected a node (named), or the build failed.
    """
    trt = import_tensorrt()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    cache_file = spec.calibration_cache
    plan = plan_build(
        spec, TrtVersion.parse(trt.__version__), calibration_feed is not None, bool(cache_file and cache_file.is_file())
    )
    manifest = engine_manifest(spec, plan, engine_environment(trt), onnx_path, manifest or {})
    build_key = sha256_json(manifest)
    if reuse and (existing := load_reusable(out_path, build_key)) is not None:
        return existing

    errors: list[str] = []
    logger = make_logger(errors)
    builder = trt.Builder(logger)
    network = _parse_network(builder, logger, plan, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mb << 20)
    builder_flags = {"FP16": trt.BuilderFlag.FP16, "INT8": trt.BuilderFlag.INT8}  # the names plan_build gives
    for name in plan.builder_flags:
        config.set_flag(builder_flags[name])
    inputs, dynamic = _batch_profile(builder, network, config, spec.batch)
    timing_cache = None
    if spec.timing_cache is not None:
        blob = spec.timing_cache.read_bytes() if spec.timing_cache.is_file() else b""
        timing_cache = config.create_timing_cache(blob)
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
    calibrator = batches = None
    if plan.int8_source == "calibrator" and calibration_feed is not None:  # the plan has a calibrator only with data
        batches = FixedBatches(calibration_feed, spec.calibration_batch, inputs)
        calibrator = make_calibrator(spec.implicit_method, batches, cache_file)
        config.int8_calibrator = calibrator
        if dynamic:
            config.set_calibration_profile(_fixed_profile(builder, network, spec.calibration_batch))
    elif plan.int8_source == "cache-ranges" and cache_file is not None:  # the plan reads a cache only when it is there
        manifest["build"]["cache_ranges"] = _apply_cache_ranges(network, cache_file)
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.free()
    if serialized is None:
        detail = "; ".join(errors[-3:]) or "see the log"
        raise ConversionError(f"TensorRT failed to build the {spec.label} engine from {onnx_path.name}: {detail}")
    if timing_cache is not None and spec.timing_cache is not None:
        write_bytes_atomic(spec.timing_cache, bytes(timing_cache.serialize()))
    if batches is not None:
        manifest["build"]["calibration_images"] = batches.images
        manifest["build"]["calibration_images_dropped"] = batches.dropped
    return write_artifact(out_path, bytes(serialized), {**manifest, "build_key": build_key})


def engine_manifest(
    spec: EngineSpec, plan: BuildPlan, env: dict[str, Any], onnx_path: Path, base: dict[str, Any]
) -> dict[str, Any]:
    """What identifies an engine: the caller's facts, this machine's TensorRT and GPU, and the build plan."""
    manifest = {
        **base,
        "format": "tensorrt-engine",
        "precision": spec.label,
        "environment": env,
        "build": {
            "network_flags": list(plan.network_flags),
            "builder_flags": list(plan.builder_flags),
            "onnx_input": plan.onnx_input,
            "int8_source": plan.int8_source,
            "calibrator": plan.calibrator,
            "calibration_cache": str(spec.calibration_cache) if spec.implicit_int8 and spec.calibration_cache else None,
            "batch_profile": [spec.batch.min, spec.batch.opt, spec.batch.max],
            "workspace_mb": spec.workspace_mb,
        },
        "source_onnx": str(onnx_path),
    }
    if not spec.implicit_int8:
        manifest.pop("calibration", None)
    return manifest


def _parse_network(
    builder: tensorrt.Builder, logger: tensorrt.ILogger, plan: BuildPlan, onnx_path: Path
) -> tensorrt.INetworkDefinition:
    trt = import_tensorrt()
    flags = 0
    for name in plan.network_flags:
        member = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if member is not None:  # a release where strong typing is the only mode may drop the flag
            flags |= 1 << int(member)
    network = builder.create_network(flags)
    with tempfile.TemporaryDirectory(prefix="quantship-trt-") as tmp:
        source = onnx_fp16(onnx_path, Path(tmp) / "model-fp16.onnx") if plan.onnx_input == "fp16" else onnx_path
        _parse_onnx(network, logger, source)
    return network


def _batch_profile(
    builder: tensorrt.Builder,
    network: tensorrt.INetworkDefinition,
    config: tensorrt.IBuilderConfig,
    batch: BatchProfile,
) -> tuple[list[tuple[str, tuple]], bool]:
    """The optimization profile of a dynamic batch dimension; returns the inputs (name, shape) and whether the
    batch is dynamic.

    Raises:
        ConversionError: An input with a dynamic dimension other than the batch.
    """
    trt = import_tensorrt()
    profile = builder.create_optimization_profile()
    inputs = []
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape: tuple[int, ...] = tensor.shape[:]  # Dims -> tuple
        inputs.append((tensor.name, (None, *shape[1:])))
        if any(d < 0 for d in shape[1:]):
            raise ConversionError(
                f"input '{tensor.name}' has dynamic non-batch dimensions {shape}; export with a fixed image size"
            )
        if shape[0] < 0:
            dynamic = True
            rest = shape[1:]
            low, opt, high = (trt.Dims([n, *rest]) for n in (batch.min, batch.opt, batch.max))
            profile.set_shape(tensor.name, low, opt, high)
    if dynamic:
        config.add_optimization_profile(profile)
    return inputs, dynamic


def _fixed_profile(
    builder: tensorrt.Builder, network: tensorrt.INetworkDefinition, batch: int
) -> tensorrt.IOptimizationProfile:
    """A profile with every input fixed at ``batch`` (the calibrator's batch size)."""
    trt = import_tensorrt()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        fixed = trt.Dims([batch, *t.shape[1:]])
        profile.set_shape(t.name, fixed, fixed, fixed)
    return profile


def _apply_cache_ranges(network: tensorrt.INetworkDefinition, cache_file: Path) -> dict[str, int]:
    """Set each network tensor's dynamic range from a calibration cache; returns how many were set / missing."""
    cache = read_cache(cache_file)
    tensors = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    for li in range(network.num_layers):
        layer = network.get_layer(li)
        for oi in range(layer.num_outputs):
            t = layer.get_output(oi)
            tensors[t.name] = t
    ranges, missing = cache_ranges(tensors, cache)
    for name, r in ranges.items():
        tensors[name].set_dynamic_range(-r, r)
    if missing:
        log.warning(
            "%d network tensors have no range in %s (they fall back to higher precision), e.g. %s",
            len(missing),
            cache_file,
            missing[0],
        )
    return {"applied": len(ranges), "missing": len(missing)}
