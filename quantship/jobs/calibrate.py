"""``quantship calibrate``: one statistics pass, then the TensorRT cache / Q/DQ model / ranges asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from quantship.config import CalibrationMethod, PreprocessSpec
from quantship.data.datasets import load_dataset
from quantship.errors import ConfigError, DataError, ModelLoadError
from quantship.jobs import JobResult
from quantship.models.loading import LoadedModel, resolve_preprocess
from quantship.targets.run import calibration_data, draw_listed_calibration, load_for


def run_calibrate(
    model: str,
    data: str,
    method: CalibrationMethod | str,
    weights: str | None = None,
    labels: str | None = None,
    cache: str | None = None,
    qdq: str | None = None,
    ranges: str | None = None,
    exclude: Sequence[str] = (),
    percentile: float | None = None,
    calib_images: int = 100,
    calib_seed: int = 0,
    calib_list: str | None = None,
    preprocess_overrides: dict[str, Any] | None = None,
    workers: int = 4,
    threads: int | None = None,
    trt_version: str | None = None,
    log_path: Path | None = None,
    allow_missing_images: bool = False,
    trust_savedmodel: bool = False,
) -> JobResult:
    """``model`` may be a registry name or Keras file (exported to ONNX with tf2onnx first), or an ``.onnx`` file
    (then ``--preprocess`` describes its input)."""
    from quantship.calibrate.api import calibrate
    from quantship.calibrate.calibrators import get_calibrator
    from quantship.calibrate.trt_cache import DEFAULT_TRT_VERSION
    from quantship.convert.calibrated import collect_statistics, write_outputs

    method = CalibrationMethod.parse(method)
    get_calibrator(method, percentile=percentile)  # a bad percentile fails before any work
    if not (cache or qdq or ranges):
        raise ConfigError("nothing to write: give at least one of --cache, --qdq, --ranges")
    preprocess = None if model.endswith(".onnx") else resolve_preprocess(model, weights, preprocess_overrides)
    dataset = load_dataset(data, labels=labels, allow_missing_images=allow_missing_images)
    out_dir = Path(qdq or cache or ranges).parent

    def onnx_source() -> tuple[LoadedModel, Path, dict[str, str], dict[str, Any]]:
        return _onnx_source(model, weights, preprocess, preprocess_overrides, out_dir, log_path, trust_savedmodel)

    # Cheap checks first: an .onnx file is only read, while a Keras model is exported (TensorFlow), so the
    # calibration images are drawn (list, count) before the export and after reading an .onnx file.
    if model.endswith(".onnx"):
        loaded, onnx_path, node_layers, source = onnx_source()
    drawn, calib_source = draw_listed_calibration(dataset, calib_images, calib_seed, calib_list)
    if not model.endswith(".onnx"):
        loaded, onnx_path, node_layers, source = onnx_source()
    calib = calibration_data(drawn, loaded, workers=workers, method=method.value, source=calib_source)
    collector = collect_statistics(
        onnx_path, calib.batches(), scope="all" if (cache or ranges) else "qdq", threads=threads
    )
    result = calibrate(collector, method, percentile)
    info = {**calib.info, "preprocess": loaded.preprocess.to_dict(), **source}
    report = write_outputs(
        result,
        onnx_path,
        cache,
        qdq,
        ranges,
        exclude,
        node_layers,
        trt_version or DEFAULT_TRT_VERSION,
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
    model: str,
    weights: str | None,
    preprocess: PreprocessSpec | None,
    overrides: dict[str, Any] | None,
    out_dir: Path,
    log_path: Path | None,
    trust_savedmodel: bool = False,
) -> tuple[LoadedModel, Path, dict[str, str], dict[str, Any]]:
    """The float ONNX model to calibrate: the ``.onnx`` file given, or the tf2onnx export of the Keras model (with
    its node -> Keras layer map, so ``--exclude`` can name Keras layers)."""
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

    from quantship.convert.onnx import convert_to_onnx, onnx_node_layers

    loaded = load_for(model, weights, preprocess, trust_savedmodel=trust_savedmodel)
    onnx_path = out_dir / f"{loaded.name}-fp32.onnx"
    manifest = {"source_model": {"name": loaded.name, "weights": loaded.weights, "weights_sha256": loaded.weights_hash}}
    convert_to_onnx(loaded.model, onnx_path, manifest=manifest, log_path=log_path)
    node_layers = onnx_node_layers(onnx.load(str(onnx_path)), loaded.model)
    return loaded, onnx_path, node_layers, {"onnx": str(onnx_path), "weights": loaded.weights}


def _check_onnx(path: Path) -> None:
    """Refuse a file that is not a valid ONNX model before any calibration work.

    Raises:
        ModelLoadError: Naming the file and what the ONNX checker says.
    """
    from quantship.lazy import lazy_import

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
