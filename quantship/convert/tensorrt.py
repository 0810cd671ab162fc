"""ONNX -> TensorRT engine, for TensorRT 10.x (weakly typed: precision flags, implicit int8 calibration) and
TensorRT 11.x (strongly typed only: int8 from Q/DQ nodes, fp16 from fp16 tensors).

What can be decided without TensorRT is kept in pure functions (version parsing, the build plan, calibration
batching, cache ranges, manifest checks, buffer sizing) and tested everywhere; the rest calls TensorRT's
documented Python API and runs where TensorRT and a GPU are present (``scripts/trt_smoke.sh``).
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from quantship.calibrate.trt_cache import CalibrationCache, read_cache
from quantship.convert.manifest import Artifact, load_reusable, write_artifact
from quantship.errors import ConfigError, ConversionError, MissingDependencyError, RuntimeBackendError
from quantship.fileio import sha256_json, write_bytes_atomic

log = logging.getLogger("quantship.tensorrt")

PRECISIONS = ("fp32", "fp16", "int8", "int8-qdq")
IMPLICIT_CALIBRATORS = ("entropy", "max")


def import_tensorrt() -> Any:
    """``import tensorrt`` with a message that says how to get it."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError as exc:
        raise MissingDependencyError(
            f"TensorRT is not installed ({exc}). Install it on a machine with an NVIDIA GPU: "
            "pip install --extra-index-url https://pypi.nvidia.com tensorrt cuda-python, or use docker/Dockerfile.gpu"
        ) from None
    except OSError as exc:  # the wheel is there but its shared libraries are not
        raise MissingDependencyError(f"TensorRT is installed but its libraries cannot be loaded: {exc}") from None
    return trt


# ------------------------------------------------------------------------------------------- versions


@dataclass(frozen=True, order=True)
class TrtVersion:
    major: int
    minor: int = 0
    patch: int = 0

    @classmethod
    def parse(cls, text: str) -> "TrtVersion":
        m = re.match(r"^\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text))
        if not m:
            raise ConfigError(f"cannot parse TensorRT version '{text}'")
        return cls(int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0))

    @property
    def strongly_typed_only(self) -> bool:
        """TensorRT 11 removed weak typing: no precision flags, no calibrators."""
        return self.major >= 11

    @property
    def supported(self) -> bool:
        return self.major in (10, 11)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


# ----------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class BatchProfile:
    """Optimization profile of the batch dimension (min <= opt <= max); min == max is a fixed batch."""

    min: int = 1
    opt: int = 8
    max: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigError(f"batch profile needs 1 <= min <= opt <= max, got {self.min}:{self.opt}:{self.max}")

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
        """``"8"`` (fixed) or ``"1:8:32"``."""
        try:
            parts = [int(p) for p in str(text).split(":")]
        except ValueError:
            raise ConfigError(f"batch profile must be N or MIN:OPT:MAX, got '{text}'") from None
        if len(parts) == 1:
            return cls(parts[0], parts[0], parts[0])
        if len(parts) != 3:
            raise ConfigError(f"batch profile must be N or MIN:OPT:MAX, got '{text}'")
        return cls(*parts)


@dataclass(frozen=True)
class EngineSpec:
    """What engine to build.

    Attributes:
        precision: ``fp32``, ``fp16``, ``int8`` (implicit, calibrated by TensorRT; TensorRT 10 only) or
            ``int8-qdq`` (explicit, from a Q/DQ ONNX model).
        calibration: ``entropy`` or ``max`` for implicit int8.
        batch: Optimization profile of the batch dimension.
        workspace_mb: Builder workspace memory pool limit.
        timing_cache: File to load the timing cache from and save it back to.
        calibration_cache: TensorRT calibration cache: read when present (TensorRT 10 then skips the
            calibration pass), written after calibration. Without calibration data, an existing cache (e.g.
            from ``quantship calibrate --cache``) gives the int8 ranges.
        calibration_batch: Batch size of the calibrator.
    """

    precision: str
    calibration: str | None = None
    batch: BatchProfile = field(default_factory=BatchProfile)
    workspace_mb: int = 2048
    timing_cache: Path | None = None
    calibration_cache: Path | None = None
    calibration_batch: int = 8

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown TensorRT precision '{self.precision}'; choose one of: {', '.join(PRECISIONS)}")
        if self.precision == "int8" and self.calibration not in IMPLICIT_CALIBRATORS:
            raise ConfigError(
                f"implicit int8 calibration in TensorRT is 'entropy' or 'max', got '{self.calibration}'; other methods "
                "go through the Q/DQ model (precision int8-qdq)"
            )
        if self.workspace_mb <= 0 or self.calibration_batch <= 0:
            raise ConfigError("workspace and calibration batch must be positive")


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
    if version.strongly_typed_only:
        if spec.precision == "int8":
            raise ConfigError(
                f"TensorRT {version} has no implicit int8 calibration (calibrators, BuilderFlag.INT8 and "
                "int8_calibrator were removed in TensorRT 11). Build from a Q/DQ ONNX model instead: target "
                "trt-int8-qdq, or 'quantship calibrate --qdq model-qdq.onnx' and build that model"
            )
        onnx_input = {"fp32": "fp32", "fp16": "fp16", "int8-qdq": "qdq"}[spec.precision]
        return BuildPlan(version, ("STRONGLY_TYPED",), (), onnx_input, None)
    # TensorRT 10: weakly typed network, precision through builder flags.
    if spec.precision == "fp32":
        return BuildPlan(version, (), (), "fp32", None)
    if spec.precision == "fp16":
        return BuildPlan(version, (), ("FP16",), "fp32", None)
    if spec.precision == "int8-qdq":
        return BuildPlan(version, (), ("INT8",), "qdq", None)
    if have_data:
        calibrator = {"entropy": "IInt8EntropyCalibrator2", "max": "IInt8MinMaxCalibrator"}[spec.calibration or "entropy"]
        return BuildPlan(version, (), ("INT8",), "fp32", "calibrator", calibrator)
    if cache_available:
        return BuildPlan(version, (), ("INT8",), "fp32", "cache-ranges")
    raise ConfigError("implicit int8 needs calibration data or an existing calibration cache (--trt-calib-cache)")


# ---------------------------------------------------------------------------- calibration batching


class FixedBatches:
    """Re-chunk a feed of batches of any size into batches of exactly ``batch_size`` (TensorRT's calibrator
    has one batch size); the incomplete remainder is dropped and counted."""

    def __init__(self, feed: Iterable[Mapping[str, np.ndarray] | np.ndarray], batch_size: int, input_names: list[str]):
        if batch_size <= 0:
            raise ConfigError("calibration batch size must be positive")
        self.feed, self.batch_size, self.input_names = feed, batch_size, input_names
        self.images = 0
        self.dropped = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        pending: dict[str, list[np.ndarray]] = {n: [] for n in self.input_names}
        have = 0
        for batch in self.feed:
            if isinstance(batch, np.ndarray):
                if len(self.input_names) != 1:
                    raise ConfigError("calibration batches must be dicts for a model with several inputs")
                batch = {self.input_names[0]: batch}
            missing = set(self.input_names) - set(batch)
            if missing:
                raise ConfigError(f"calibration batch lacks input(s) {sorted(missing)}")
            n = next(iter(batch.values())).shape[0]
            for name in self.input_names:
                pending[name].append(np.asarray(batch[name], dtype=np.float32))
            have += n
            while have >= self.batch_size:
                merged = {name: np.concatenate(parts) for name, parts in pending.items()}
                out = {name: np.ascontiguousarray(a[: self.batch_size]) for name, a in merged.items()}
                pending = {name: [a[self.batch_size :]] for name, a in merged.items()}
                have -= self.batch_size
                self.images += self.batch_size
                yield out
        self.dropped = have


def cache_ranges(tensor_names: Iterable[str], cache: CalibrationCache) -> tuple[dict[str, float], list[str]]:
    """Dynamic range (scale * 127) for each network tensor found in the cache, and the tensors missing."""
    ranges, missing = {}, []
    for name in tensor_names:
        if name in cache.scales:
            ranges[name] = cache.scales[name] * 127.0
        else:
            missing.append(name)
    return ranges, missing


# ----------------------------------------------------------------------------------------- manifests


def engine_environment(trt: Any = None) -> dict[str, Any]:
    """TensorRT version and GPU of this machine (needs TensorRT and a GPU)."""
    from quantship.runtime.cuda import device_info

    trt = trt or import_tensorrt()
    return {"tensorrt": trt.__version__, **device_info()}


def check_engine_compatible(manifest: Mapping[str, Any], env: Mapping[str, Any], path: str = "engine") -> None:
    """Refuse an engine built with another TensorRT version or on another GPU, naming both.

    Raises:
        RuntimeBackendError: TensorRT version, GPU model or compute capability differ.
    """
    built = manifest.get("environment") or {}
    problems = []
    if built.get("tensorrt") and built["tensorrt"] != env.get("tensorrt"):
        problems.append(f"TensorRT {built['tensorrt']} (this machine: TensorRT {env.get('tensorrt')})")
    if built.get("compute_capability") and built["compute_capability"] != env.get("compute_capability"):
        problems.append(f"compute capability {built['compute_capability']} (this machine: {env.get('compute_capability')})")
    if built.get("gpu") and built["gpu"] != env.get("gpu"):
        problems.append(f"GPU {built['gpu']} (this machine: {env.get('gpu')})")
    if problems:
        raise RuntimeBackendError(
            f"{path}: built with {'; '.join(problems)}. TensorRT engines only run on the TensorRT version and GPU "
            "model they were built with: rebuild it here (quantship convert --targets trt-...)"
        )


# ----------------------------------------------------------------------------------------- building


def _make_logger(trt: Any, sink: list[str]) -> Any:
    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.ERROR,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.INFO,
        trt.ILogger.Severity.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):
        """Routes TensorRT's builder/runtime log through Python logging; keeps errors for our messages."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:  # noqa: A003 - TensorRT's interface
            level = levels.get(severity, logging.INFO)
            log.log(level, "%s", msg)
            if level >= logging.ERROR:
                sink.append(msg)

    return _Logger()


def _device_buffer_factory():
    """Device buffers from cuda-python, or from pycuda when only that is installed."""
    try:
        from quantship.runtime.cuda import DeviceBuffer, cudart

        cudart()
        return DeviceBuffer
    except MissingDependencyError:
        pass
    try:
        import pycuda.autoinit  # noqa: F401
        import pycuda.driver as drv
    except ImportError:
        raise MissingDependencyError("the TensorRT calibrator needs cuda-python (pip install cuda-python) or pycuda") from None

    class PycudaBuffer:
        def __init__(self, nbytes: int):
            self.nbytes = nbytes
            self._mem = drv.mem_alloc(max(1, nbytes))
            self.ptr = int(self._mem)

        def copy_from(self, array: np.ndarray) -> None:
            drv.memcpy_htod(self._mem, np.ascontiguousarray(array))

        def free(self) -> None:
            self._mem.free()

    return PycudaBuffer


def make_calibrator(trt: Any, method: str, batches: FixedBatches, cache_path: Path | None) -> Any:
    """An ``IInt8EntropyCalibrator2`` or ``IInt8MinMaxCalibrator`` fed from ``batches`` (TensorRT 10)."""
    base = {"entropy": trt.IInt8EntropyCalibrator2, "max": trt.IInt8MinMaxCalibrator}[method]
    buffer_cls = _device_buffer_factory()

    class Calibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self._iter = iter(batches)
            self._buffers: dict[str, Any] = {}

        def get_batch_size(self) -> int:
            return batches.batch_size

        def get_batch(self, names: list[str], *args: Any) -> list[int] | None:
            try:
                batch = next(self._iter)
            except StopIteration:
                return None
            ptrs = []
            for name in names:
                array = batch[name]
                buf = self._buffers.get(name)
                if buf is None:
                    buf = self._buffers[name] = buffer_cls(array.nbytes)
                buf.copy_from(array)
                ptrs.append(buf.ptr)
            return ptrs

        def read_calibration_cache(self) -> bytes | None:
            if cache_path is not None and Path(cache_path).is_file():
                log.info("reusing TensorRT calibration cache %s", cache_path)
                return Path(cache_path).read_bytes()
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_path is not None:
                write_bytes_atomic(cache_path, bytes(cache))

        def free(self) -> None:
            for buf in self._buffers.values():
                buf.free()
            self._buffers.clear()

    return Calibrator()


def onnx_fp16(onnx_path: Path, out_path: Path) -> Path:
    """An fp16 copy of an ONNX model with float32 inputs/outputs (for strongly typed TensorRT 11)."""
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return out_path


def _parse_onnx(trt: Any, network: Any, logger: Any, path: Path) -> None:
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
    """Build a serialized engine from an ONNX model (a Q/DQ model for ``int8-qdq``) and write it with its
    manifest (TensorRT version, GPU and compute capability, precision, calibration method and data hash).

    Raises:
        MissingDependencyError: No TensorRT or no cuda-python.
        RuntimeBackendError: No GPU, or a CUDA driver/runtime mismatch.
        ConfigError: The spec does not fit this TensorRT generation.
        ConversionError: The parser rejected a node (named), or the build failed.
    """
    trt = import_tensorrt()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    version = TrtVersion.parse(trt.__version__)
    env = engine_environment(trt)
    cache_file = spec.calibration_cache
    plan = plan_build(spec, version, calibration_feed is not None, bool(cache_file and Path(cache_file).is_file()))
    manifest = {
        **(manifest or {}),
        "format": "tensorrt-engine",
        "precision": spec.precision,
        "environment": env,
        "build": {
            "network_flags": list(plan.network_flags),
            "builder_flags": list(plan.builder_flags),
            "onnx_input": plan.onnx_input,
            "int8_source": plan.int8_source,
            "calibrator": plan.calibrator,
            "batch_profile": [spec.batch.min, spec.batch.opt, spec.batch.max],
            "workspace_mb": spec.workspace_mb,
        },
        "source_onnx": str(onnx_path),
    }
    if spec.precision != "int8":
        manifest.pop("calibration", None)
    build_key = sha256_json(manifest)
    if reuse and (existing := load_reusable(out_path, build_key)) is not None:
        return existing

    errors: list[str] = []
    logger = _make_logger(trt, errors)
    builder = trt.Builder(logger)
    flags = 0
    for name in plan.network_flags:
        member = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if member is not None:  # a release where strong typing is the only mode may drop the flag
            flags |= 1 << int(member)
    network = builder.create_network(flags)
    with tempfile.TemporaryDirectory(prefix="quantship-trt-") as tmp:
        source = onnx_fp16(onnx_path, Path(tmp) / "model-fp16.onnx") if plan.onnx_input == "fp16" else onnx_path
        _parse_onnx(trt, network, logger, source)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mb << 20)
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))

    profile = builder.create_optimization_profile()
    input_names = []
    dynamic = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        input_names.append(tensor.name)
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise ConversionError(f"input '{tensor.name}' has dynamic non-batch dimensions {shape}; export with a fixed image size")
        if shape[0] < 0:
            dynamic = True
            rest = shape[1:]
            profile.set_shape(tensor.name, (spec.batch.min, *rest), (spec.batch.opt, *rest), (spec.batch.max, *rest))
    if dynamic:
        config.add_optimization_profile(profile)

    timing_cache = None
    if spec.timing_cache is not None:
        blob = Path(spec.timing_cache).read_bytes() if Path(spec.timing_cache).is_file() else b""
        timing_cache = config.create_timing_cache(blob)
        config.set_timing_cache(timing_cache, ignore_mismatch=False)

    calibrator = None
    if plan.int8_source == "calibrator":
        batches = FixedBatches(calibration_feed, spec.calibration_batch, input_names)
        calibrator = make_calibrator(trt, spec.calibration or "entropy", batches, cache_file)
        config.int8_calibrator = calibrator
        if dynamic:
            calib_profile = builder.create_optimization_profile()
            for i in range(network.num_inputs):
                t = network.get_input(i)
                fixed = (spec.calibration_batch, *tuple(t.shape)[1:])
                calib_profile.set_shape(t.name, fixed, fixed, fixed)
            config.set_calibration_profile(calib_profile)
    elif plan.int8_source == "cache-ranges":
        cache = read_cache(cache_file)
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        tensors = {n: network.get_input(i) for i, n in enumerate(names)}
        for li in range(network.num_layers):
            layer = network.get_layer(li)
            for oi in range(layer.num_outputs):
                t = layer.get_output(oi)
                tensors[t.name] = t
        ranges, missing = cache_ranges(tensors, cache)
        for name, r in ranges.items():
            tensors[name].set_dynamic_range(-r, r)
        manifest["build"]["cache_ranges"] = {"applied": len(ranges), "missing": len(missing)}
        if missing:
            log.warning("%d network tensors have no range in %s (they fall back to higher precision), e.g. %s", len(missing), cache_file, missing[0])

    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.free()
    if serialized is None:
        detail = "; ".join(errors[-3:]) or "see the log"
        raise ConversionError(f"TensorRT failed to build the {spec.precision} engine from {onnx_path.name}: {detail}")
    if timing_cache is not None:
        write_bytes_atomic(spec.timing_cache, bytes(timing_cache.serialize()))
    if plan.int8_source == "calibrator":
        manifest["build"]["calibration_images"] = batches.images
        manifest["build"]["calibration_images_dropped"] = batches.dropped
    return write_artifact(out_path, bytes(serialized), {**manifest, "build_key": build_key})
