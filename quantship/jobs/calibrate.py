"""``quantship calibrate``: one statistics pass, then the TensorRT cache / Q/DQ model / ranges asked for."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from quantship.calibrate.api import calibrate
from quantship.calibrate.calibrators import get_calibrator
from quantship.calibrate.trt_cache import DEFAULT_TRT_VERSION
from quantship.config import CalibrationMethod, CalibrationSpec, PreprocessSpec
from quantship.convert.calibrated import CalibrationOutputs, collect_statistics, write_outputs
from quantship.convert.onnx import convert_to_onnx, onnx_node_layers
from quantship.data.datasets import load_dataset
from quantship.errors import ConfigError, DataError, ModelLoadError
from quantship.jobs import JobResult
from quantship.lazy import lazy_import
from quantship.models.loading import LoadedModel, resolve_preprocess
from quantship.targets.run import calibration_data, draw_listed_calibration, load_for


@dataclass
class CalibrateSpec:
    """Everything ``quantship calibrate`` needs.

    Attributes:
        model: A registry name or Keras file (exported to ONNX with tf2onnx first), or an ``.onnx`` file (then
            ``preprocess_overrides`` describe its input).
        cache, qdq, ranges: Where to write the TensorRT cache, the Q/DQ ONNX model and the ranges JSON (one at
            least).
        exclude: Node or Keras layer names kept in float in the Q/DQ model.
        percentile: The percentile of the ``percentile`` method (None: its default).
        calibration: Count, seed and list of the calibration images drawn from ``data``.
    """

    model: str
    data: str
    method: CalibrationMethod | str
    weights: str | None = None
    labels: str | None = None
    cache: str | None = None
    qdq: str | None = None
    ranges: str | None = None
    exclude: Sequence[str] = ()
    percentile: float | None = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    preprocess_overrides: dict[str, Any] | None = None
    workers: int = 4
    threads: int | None = None
    trt_version: str | None = None
    log_path: Path | None = None
    allow_missing_images: bool = False
    trust_savedmodel: bool = False


def run_calibrate(spec: CalibrateSpec) -> JobResult:
    """One statistics pass over the calibration images, then the outputs the spec asks for."""

    model, cache, qdq, ranges, percentile = spec.model, spec.cache, spec.qdq, spec.ranges, spec.percentile
    method = CalibrationMethod.parse(spec.method)
    get_calibrator(method, percentile=percentile)  # a bad percentile fails before any work
    if not (cache or qdq or ranges):
        raise ConfigError("nothing to write: give at least one of --cache, --qdq, --ranges")
    preprocess = None if model.endswith(".onnx") else resolve_preprocess(model, spec.weights, spec.preprocess_overrides)
    dataset = load_dataset(spec.data, labels=spec.labels, allow_missing_images=spec.allow_missing_images)
    out_dir = Path(qdq or cache or ranges).parent

    def onnx_source() -> tuple[LoadedModel, Path, dict[str, str], dict[str, Any]]:
        return _onnx_source(spec, preprocess, out_dir)

    # Cheap checks first: an .onnx file is only read, while a Keras model is exported (TensorFlow), so the
    # calibration images are drawn (list, count) before the export and after reading an .onnx file.
    if model.endswith(".onnx"):
        loaded, onnx_path, node_layers, source = onnx_source()
    cal = spec.calibration
    drawn, calib_source = draw_listed_calibration(dataset, cal.num_images, cal.seed, cal.list)
    if not model.endswith(".onnx"):
        loaded, onnx_path, node_layers, source = onnx_source()
    calib = calibration_data(drawn, loaded, workers=spec.workers, method=method.value, source=calib_source)
    collector = collect_statistics(
        onnx_path, calib.batches(), scope="all" if (cache or ranges) else "qdq", threads=spec.threads
    )
    result = calibrate(collector, method, percentile)
    info = {**calib.info, "preprocess": loaded.preprocess.to_dict(), **source}
    report = write_outputs(
        result,
        onnx_path,
        CalibrationOutputs(cache, qdq, ranges),
        spec.exclude,
        node_layers,
        spec.trt_version or DEFAULT_TRT_VERSION,
        {"calibration": info},
    )
    lines = [
        f"{method.value} calibration on {collector.images} images: ranges for {len(result.amax)} of "
        f"{len(collector.stats)} observed tensors "
        f"(histograms: {collector.memory_bytes() / 1e6:.1f} MB); float model: {onnx_path}"
    ]
    for what, path in (("TensorRT calibration cache", cache), ("Q/DQ ONNX model", qdq), ("ranges JSON", ranges)):
        if path:
            lines.append(f"  {what}: {path}")
    lines += [f"  Q/DQ: {line}" for line in (report.lines() if report else [])]
    row = {
        "tensors": len(result.amax),
        "observed": len(collector.stats),
        "images": collector.images,
        "onnx": str(onnx_path),
    }
    return JobResult([row], lines)


def _onnx_source(
    spec: CalibrateSpec, preprocess: PreprocessSpec | None, out_dir: Path
) -> tuple[LoadedModel, Path, dict[str, str], dict[str, Any]]:
    """The float ONNX model to calibrate: the ``.onnx`` file given, or the tf2onnx export of the Keras model (with
    its node -> Keras layer map, so ``--exclude`` can name Keras layers)."""
    model, overrides = spec.model, spec.preprocess_overrides
    if model.endswith(".onnx"):
        onnx_path = Path(model)
        if not onnx_path.is_file():
            raise DataError(f"ONNX model not found: {onnx_path}")
        if not overrides:
            raise ConfigError("an ONNX model needs --preprocess to describe its input (e.g. mode=tf,size=224)")
        _check_onnx(onnx_path)
        loaded = LoadedModel(onnx_path.stem, None, PreprocessSpec().with_overrides(**overrides), str(onnx_path), "")
        return loaded, onnx_path, {}, {"onnx": str(onnx_path)}
    import onnx

    loaded = load_for(model, spec.weights, preprocess, trust_savedmodel=spec.trust_savedmodel)
    onnx_path = out_dir / f"{loaded.name}-fp32.onnx"
    manifest = {"source_model": {"name": loaded.name, "weights": loaded.weights, "weights_sha256": loaded.weights_hash}}
    convert_to_onnx(loaded.model, onnx_path, manifest=manifest, log_path=spec.log_path)
    node_layers = onnx_node_layers(onnx.load(str(onnx_path)), loaded.model)
    return loaded, onnx_path, node_layers, {"onnx": str(onnx_path), "weights": loaded.weights}


def _check_onnx(path: Path) -> None:
    """Refuse a file that is not a valid ONNX model before any calibration work.

    Raises:
        ModelLoadError: Naming the file and what the ONNX checker says.
    """

    onnx = lazy_import("onnx")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001 - protobuf and the checker raise many types
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = lines[0][:200] if lines else type(exc).__name__
        raise ModelLoadError(
            f"{path}: not a valid ONNX model ({why}); give a .onnx file exported by tf2onnx or torch"
        ) from None
    if not proto.graph.input or not proto.graph.output:
        raise ModelLoadError(f"{path}: the ONNX graph has no inputs or outputs")
