"""The jobs the CLI runs, as library functions: convert a model to targets, evaluate targets on data."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from quantship.config import CropMode, EvalSpec, PreprocessSpec
from quantship.convert.manifest import Artifact
from quantship.errors import DataError
from quantship.evaluate.datasets import ImageDataset, Skipped, iter_batches, load_dataset, split_calibration
from quantship.evaluate.metrics import TopKAccuracy
from quantship.evaluate.results import write_results
from quantship.fileio import sha256_json, write_text_atomic
from quantship.models.loading import LoadedModel, load_model
from quantship.progress import track
from quantship.runtime.base import Runner
from quantship.targets import BuildContext, Target, get_target

log = logging.getLogger("quantship")
REFERENCE_TARGET = "keras-fp32"


def resolve_preprocess(model: str, overrides: dict[str, Any] | None) -> PreprocessSpec | None:
    """The model's default preprocessing with user overrides (as timm's ``resolve_data_config``).

    Returns None when there is nothing to override for a registry model (its default applies). A model given
    as a file has no defaults: the overrides are applied to :class:`PreprocessSpec`'s.

    Raises:
        ConfigError: Unknown registry model or option.
    """
    from quantship.models.registry import get_model_spec

    is_file = Path(model).suffix in (".keras", ".h5") or Path(model).exists()
    base = PreprocessSpec() if is_file else get_model_spec(model).preprocess
    if not overrides:
        return None
    return base.with_overrides(**overrides)


def calibration_batches_factory(calib: ImageDataset, loaded: LoadedModel, batch_size: int = 8, workers: int = 4):
    """A callable returning the calibration batches (decoded once, then kept in memory).

    Calibration always uses the single centre crop, whatever the evaluation crop mode.
    """
    spec = dataclasses.replace(loaded.preprocess, crops=CropMode.CENTER)
    cache: list[np.ndarray] = []

    def batches() -> list[np.ndarray]:
        if not cache:
            skipped: list[Skipped] = []
            for b in iter_batches(calib, spec, batch_size, workers, skipped):
                cache.append(b.inputs[:, 0])
            if not cache:
                raise DataError(f"no readable calibration image among {len(calib)} ({skipped[0].reason if skipped else ''})")
        return cache

    return batches


def draw_calibration(dataset: ImageDataset, num_images: int, seed: int) -> ImageDataset:
    """``num_images`` calibration images drawn (seeded) from a dataset used for calibration only.

    Raises:
        DataError: The dataset holds fewer images than asked for.
    """
    if len(dataset) < num_images:
        raise DataError(f"{dataset.source}: {len(dataset)} images, fewer than the {num_images} calibration images asked for")
    return dataset if len(dataset) == num_images else split_calibration(dataset, num_images, None, seed)[0]


def calibration_info(calib: ImageDataset, loaded: LoadedModel, method: str | None = None) -> dict[str, Any]:
    info = {"num_images": len(calib), "data_hash": calib.keys_hash(), "source": calib.source}
    if method:
        info["method"] = method
    return info


@dataclass
class TargetResult:
    target: Target
    artifact: Artifact | None
    runner: Runner
    metric: Any = field(default_factory=TopKAccuracy)  # TopKAccuracy, or a detection metric
    seconds: float = 0.0  # runtime time over the timed batches (the first batch is warm-up)
    timed_images: int = 0
    probs: list[np.ndarray] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)


def build_targets(ctx: BuildContext, targets: Sequence[Target]) -> dict[str, Artifact | None]:
    artifacts = {}
    for t in track(targets, total=len(targets), desc="convert"):
        log.info("building %s", t.name)
        artifacts[t.name] = t.build(ctx, t.spec)
    return artifacts


def evaluate_classification(
    dataset: ImageDataset,
    ctx: BuildContext,
    targets: Sequence[Target],
    artifacts: dict[str, Artifact | None],
    batch_size: int = 8,
    workers: int = 4,
    keep_probs: bool = False,
) -> tuple[list[TargetResult], list[Skipped]]:
    """Run every target on the same decoded, preprocessed batches (one decode per image for all targets)."""
    results = [TargetResult(t, artifacts[t.name], t.make_runner(ctx, t.spec, artifacts[t.name])) for t in targets]
    skipped: list[Skipped] = []
    for r in results:
        r.runner.activate()
    try:
        spec = ctx.loaded.preprocess
        n_batches = (len(dataset) + batch_size - 1) // batch_size
        batches = iter_batches(dataset, spec, batch_size, workers, skipped)
        for i, batch in enumerate(track(batches, total=n_batches, desc="evaluate")):
            classify_batch(results, batch, timed=i > 0 or n_batches == 1, keep_probs=keep_probs)
    finally:
        for r in results:
            r.runner.deactivate()
    return results, skipped


def classify_batch(results: Sequence[TargetResult], batch: Any, timed: bool = True, keep_probs: bool = False) -> None:
    """Run one batch through every target, averaging over the views of multi-crop evaluation.

    ``timed=False`` leaves the call out of the latency figures (the first call traces and allocates).
    """
    b, v = batch.inputs.shape[:2]
    flat = batch.inputs.reshape(b * v, *batch.inputs.shape[2:])
    for r in results:
        out = r.runner.infer(flat)
        scores = next(iter(out.values())).reshape(b, v, -1).mean(axis=1)
        if timed:
            r.seconds += r.runner.last_inference_time or 0.0
            r.timed_images += b
        r.metric.update(scores, batch.labels)
        r.keys.extend(batch.keys)
        if keep_probs:
            r.probs.append(scores)


def result_rows(
    results: Sequence[TargetResult], loaded: LoadedModel, dataset: ImageDataset, skipped: Sequence[Skipped], extra: dict | None = None
) -> list[dict[str, Any]]:
    """One flat row per target, with differences and top-1 agreement against the reference target."""
    ref = next((r for r in results if r.target.name == REFERENCE_TARGET), results[0])
    ref_m = ref.metric.result()
    rows = []
    for r in results:
        m = r.metric.result()
        n = r.metric.count
        agree = float(np.mean(np.asarray(r.metric.top1) == np.asarray(ref.metric.top1))) if n else float("nan")
        art = r.artifact
        rows.append(
            {
                "model": loaded.name,
                "target": r.target.name,
                "runtime": r.target.spec.backend.value,
                "precision": r.target.spec.precision.value,
                "dataset": dataset.source,
                "task": "classification",
                "images": n,
                "skipped": len(skipped),
                "top1": m["top1"],
                "top5": m["top5"],
                "delta_top1": m["top1"] - ref_m["top1"],
                "delta_top5": m["top5"] - ref_m["top5"],
                "reference": ref.target.name,
                "agreement_top1": agree,
                "latency_ms": 1e3 * r.seconds / r.timed_images if r.timed_images else None,
                "artifact": str(art.path) if art else None,
                "manifest": str(art.manifest_path) if art else None,
                "size_mb": art.manifest["size_bytes"] / 1e6 if art else None,
                "weights": loaded.weights,
                "preprocess_hash": loaded.preprocess.hash(),
                "eval_data_hash": dataset.keys_hash(),
                "crops": loaded.preprocess.crops.value,
                **(extra or {}),
            }
        )
    return rows


def prepare_run(
    loaded: LoadedModel,
    targets: Sequence[Target],
    dataset: ImageDataset,
    calibration: Any,
    limit: int | None,
    out_dir: Path,
    threads: int | None,
    workers: int,
    options: dict[str, Any],
) -> tuple[BuildContext, ImageDataset, ImageDataset]:
    """Split calibration/evaluation images (calibration only when a target needs it) and make the context
    that builds every target's artifact."""
    needs_calib = any(t.spec.needs_calibration for t in targets)
    calib, evalset = split_calibration(dataset, calibration.num_images if needs_calib else 0, limit, calibration.seed)
    ctx = BuildContext(
        loaded,
        out_dir,
        calibration_batches=calibration_batches_factory(calib, loaded, workers=workers) if needs_calib else None,
        calibration_info=calibration_info(calib, loaded) if needs_calib else {},
        threads=threads,
        log_path=out_dir / "convert.log",
        options=dict(options),
    )
    return ctx, calib, evalset


def detection_anchors(loaded: LoadedModel, dataset: ImageDataset, anchors_file: str | None):
    """The anchor configuration of a detection model (registry default or ``--anchors FILE``), checked
    against the dataset's classes and the model's output."""
    from quantship.errors import ConfigError
    from quantship.models.ssd import AnchorConfig, make_anchors

    n_classes = len(dataset.meta["classes"]) + 1
    if anchors_file:
        cfg = AnchorConfig.load(anchors_file)
    elif loaded.spec is not None and "anchors" in loaded.spec.extra:
        cfg = loaded.spec.extra["anchors"](n_classes)
    else:
        raise ConfigError(f"{loaded.name}: a detection model given as a file needs --anchors FILE (its anchor configuration as JSON)")
    out_shape = tuple(loaded.model.outputs[0].shape[1:])
    if out_shape != (len(make_anchors(cfg)), cfg.num_classes + 4):
        raise ConfigError(f"{loaded.name}: output {out_shape} does not fit {len(make_anchors(cfg))} anchors x ({cfg.num_classes} classes + 4)")
    if cfg.num_classes != n_classes:
        raise ConfigError(f"{loaded.name}: {cfg.num_classes - 1} object classes, the dataset has {n_classes - 1}")
    return cfg


def evaluate_detection(dataset: ImageDataset, ctx: BuildContext, targets: Sequence[Target], artifacts: dict[str, Artifact | None], anchors_cfg: Any, batch_size: int = 8, workers: int = 4):
    """Every target on the same batches; one numpy post-processing (anchors, decoding, NMS) for all."""
    from quantship.evaluate.detection_metrics import metric_for
    from quantship.models.ssd import make_anchors, postprocess

    anchors = make_anchors(anchors_cfg)
    results = [TargetResult(t, artifacts[t.name], t.make_runner(ctx, t.spec, artifacts[t.name]), metric_for(dataset.meta)) for t in targets]
    skipped: list[Skipped] = []
    for r in results:
        r.runner.activate()
    try:
        n_batches = (len(dataset) + batch_size - 1) // batch_size
        for i, batch in enumerate(track(iter_batches(dataset, ctx.loaded.preprocess, batch_size, workers, skipped), total=n_batches, desc="evaluate")):
            flat = batch.inputs[:, 0]
            for r in results:
                out = next(iter(r.runner.infer(flat).values()))
                if i > 0 or n_batches == 1:
                    r.seconds += r.runner.last_inference_time or 0.0
                    r.timed_images += len(flat)
                dets = [postprocess(o, anchors, anchors_cfg, (lab["width"], lab["height"])) for o, lab in zip(out, batch.labels)]
                r.metric.update(dets, batch.labels)
    finally:
        for r in results:
            r.runner.deactivate()
    return results, skipped


def detection_rows(results: Sequence[TargetResult], loaded: LoadedModel, dataset: ImageDataset, skipped: Sequence[Skipped]) -> list[dict[str, Any]]:
    ref = next((r for r in results if r.target.name == REFERENCE_TARGET), results[0])
    metrics = [r.metric.result() for r in results]
    ref_m = metrics[results.index(ref)]
    rows = []
    for r, m in zip(results, metrics):
        art = r.artifact
        rows.append({
            "model": loaded.name, "target": r.target.name, "runtime": r.target.spec.backend.value, "precision": r.target.spec.precision.value,
            "dataset": dataset.source, "task": "detection", "images": r.metric.count, "skipped": len(skipped),
            **{k: v for k, v in m.items() if not isinstance(v, dict)},
            "delta_mAP": m["mAP"] - ref_m["mAP"], "reference": ref.target.name,
            "per_class_ap": m.get("per_class_ap"),
            "latency_ms": 1e3 * r.seconds / r.timed_images if r.timed_images else None,
            "artifact": str(art.path) if art else None, "manifest": str(art.manifest_path) if art else None,
            "size_mb": art.manifest["size_bytes"] / 1e6 if art else None, "weights": loaded.weights,
            "preprocess_hash": loaded.preprocess.hash(), "eval_data_hash": dataset.keys_hash(),
        })
    return rows


def run_eval(spec: EvalSpec) -> list[dict[str, Any]]:
    """``quantship eval``: build every target, evaluate all on the same images, write results.

    Returns:
        The result rows (also written to ``out_dir/results.jsonl`` and ``results.md``).
    """
    # Names are checked before any work: unknown targets, models or options fail at once.
    targets = [get_target(n) for n in spec.targets]
    preprocess = resolve_preprocess(spec.model, spec.preprocess_overrides)
    dataset = load_dataset(spec.data, labels=spec.labels)
    if dataset.task == "detection":
        return _run_eval_detection(spec, targets, preprocess, dataset)
    loaded = load_model(spec.model, spec.weights, preprocess)
    out_dir = Path(spec.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx, calib, evalset = prepare_run(loaded, targets, dataset, spec.calibration, spec.limit, out_dir, spec.threads, spec.workers, spec.options)
    try:
        artifacts = build_targets(ctx, targets)
        results, skipped = evaluate_classification(evalset, ctx, targets, artifacts, spec.batch_size, spec.workers)
    finally:
        ctx.close()
    if skipped:
        write_text_atomic(out_dir / "skipped.txt", "".join(f"{s.key}\t{s.reason}\n" for s in skipped))
    rows = result_rows(results, loaded, evalset, skipped, {"calibration_images": len(calib), "eval_spec_hash": sha256_json(dataclasses.asdict(spec))[:16]})
    notes = [f"{len(evalset)} evaluation images from {dataset.source}; {len(calib)} disjoint calibration images"]
    if skipped:
        notes.append(f"{len(skipped)} unreadable image(s) skipped, listed in skipped.txt")
    write_results(out_dir, rows, f"quantship eval: {loaded.name}", notes)
    return rows


def run_convert(
    model: str,
    targets: Sequence[str],
    out_dir: Path,
    weights: str | None = None,
    data: str | None = None,
    labels: str | None = None,
    calib_images: int = 100,
    calib_seed: int = 0,
    preprocess_overrides: dict[str, Any] | None = None,
    workers: int = 4,
    options: dict[str, Any] | None = None,
) -> dict[str, Artifact | None]:
    """``quantship convert``: write each target's artifact and manifest under ``out_dir/artifacts``."""
    from quantship.errors import ConfigError

    chosen = [get_target(n) for n in targets]
    preprocess = resolve_preprocess(model, preprocess_overrides)
    options = dict(options or {})
    # TensorRT's implicit int8 can take its ranges from a calibration cache instead of data.
    from_cache = {"trt-int8-entropy", "trt-int8-max"} if options.get("trt_calibration_cache") else set()
    needs_calib = any(t.spec.needs_calibration and t.name not in from_cache for t in chosen)
    if needs_calib and not data:
        names = ", ".join(t.name for t in chosen if t.spec.needs_calibration)
        raise ConfigError(f"{names} need calibration images: pass --data KIND:PATH (calibration draws --calib-images from it)")
    loaded = load_model(model, weights, preprocess)
    ctx = BuildContext(loaded, Path(out_dir), log_path=Path(out_dir) / "convert.log", options=options)
    if needs_calib:
        dataset = load_dataset(data, labels=labels)
        calib = draw_calibration(dataset, calib_images, calib_seed)
        ctx.calibration_batches = calibration_batches_factory(calib, loaded, workers=workers)
        ctx.calibration_info = calibration_info(calib, loaded)
    try:
        return build_targets(ctx, chosen)
    finally:
        ctx.close()


def run_calibrate(
    model: str,
    data: str,
    method: str,
    weights: str | None = None,
    labels: str | None = None,
    cache: str | None = None,
    qdq: str | None = None,
    ranges: str | None = None,
    exclude: Sequence[str] = (),
    percentile: float | None = None,
    calib_images: int = 100,
    calib_seed: int = 0,
    preprocess_overrides: dict[str, Any] | None = None,
    workers: int = 4,
    threads: int | None = None,
    trt_version: str | None = None,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """``quantship calibrate``: one statistics pass, then the TensorRT cache / Q/DQ model / ranges asked for.

    ``model`` may be a registry name or Keras file (exported to ONNX with tf2onnx first), or an ``.onnx`` file
    (then ``--preprocess`` describes its input).
    """
    from quantship.calibrate.api import calibrate, collect_statistics, write_outputs
    from quantship.calibrate.calibrators import get_calibrator
    from quantship.calibrate.trt_cache import DEFAULT_TRT_VERSION
    from quantship.convert.onnx import convert_to_onnx
    from quantship.errors import ConfigError

    get_calibrator(method, percentile=percentile)  # unknown method: fail before any work
    if not (cache or qdq or ranges):
        raise ConfigError("nothing to write: give at least one of --cache, --qdq, --ranges")
    dataset = load_dataset(data, labels=labels)
    node_layers: dict[str, str] = {}
    if model.endswith(".onnx"):
        onnx_path = Path(model)
        if not onnx_path.is_file():
            raise DataError(f"ONNX model not found: {onnx_path}")
        if not preprocess_overrides:
            raise ConfigError("an ONNX model needs --preprocess to describe its input (e.g. mode=tf,size=224)")
        loaded = LoadedModel(onnx_path.stem, None, PreprocessSpec().with_overrides(**preprocess_overrides), str(onnx_path), "")
        source = {"onnx": str(onnx_path)}
    else:
        loaded = load_model(model, weights, resolve_preprocess(model, preprocess_overrides))
        out_dir = Path(qdq or cache or ranges).parent
        onnx_path = out_dir / f"{loaded.name}-fp32.onnx"
        convert_to_onnx(loaded.model, onnx_path, manifest={"source_model": {"name": loaded.name, "weights": loaded.weights, "weights_sha256": loaded.weights_hash}}, log_path=log_path)
        import onnx

        from quantship.convert.onnx import onnx_node_layers

        node_layers = onnx_node_layers(onnx.load(str(onnx_path)), loaded.model)
        source = {"onnx": str(onnx_path), "weights": loaded.weights}
    calib = draw_calibration(dataset, calib_images, calib_seed)
    batches = calibration_batches_factory(calib, loaded, workers=workers)
    collector = collect_statistics(onnx_path, batches(), scope="all" if (cache or ranges) else "qdq", threads=threads)
    result = calibrate(collector, method, percentile)
    info = {**calibration_info(calib, loaded, method), "preprocess": loaded.preprocess.to_dict(), **source}
    report = write_outputs(result, onnx_path, cache, qdq, ranges, exclude, node_layers, trt_version or DEFAULT_TRT_VERSION, {"calibration": info})
    return {
        "tensors": len(result.amax),
        "observed": len(collector.stats),
        "images": collector.images,
        "histogram_bytes": collector.memory_bytes(),
        "onnx": str(onnx_path),
        "report": report.lines() if report else [],
    }


DETECTION_COLUMNS = (
    ("target", "target", "{}"), ("images", "images", "{}"), ("mAP", "mAP", "{:.4f}"), ("delta_mAP", "Δ mAP", "{:+.4f}"),
    ("mAP_allpoint", "mAP (all-point)", "{:.4f}"), ("AP50", "AP50", "{:.4f}"), ("AP75", "AP75", "{:.4f}"),
    ("latency_ms", "ms/image", "{:.2f}"), ("size_mb", "size MB", "{:.2f}"),
)


def _run_eval_detection(spec: EvalSpec, targets: Sequence[Target], preprocess: PreprocessSpec | None, dataset: ImageDataset) -> list[dict[str, Any]]:
    from quantship.evaluate.results import markdown_table

    n_classes = len(dataset.meta["classes"]) + 1
    loaded = load_model(spec.model, spec.weights, preprocess, num_classes=n_classes if not Path(spec.model).exists() else None)
    anchors_cfg = detection_anchors(loaded, dataset, spec.options.get("anchors"))
    out_dir = Path(spec.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx, calib, evalset = prepare_run(loaded, targets, dataset, spec.calibration, spec.limit, out_dir, spec.threads, spec.workers, spec.options)
    try:
        artifacts = build_targets(ctx, targets)
        results, skipped = evaluate_detection(evalset, ctx, targets, artifacts, anchors_cfg, spec.batch_size, spec.workers)
    finally:
        ctx.close()
    rows = detection_rows(results, loaded, evalset, skipped)
    for r in rows:
        r["calibration_images"] = len(calib)
    import json as _json

    write_text_atomic(out_dir / "results.jsonl", "".join(_json.dumps(r, sort_keys=True) + "\n" for r in rows))
    md = [f"# quantship eval (detection): {loaded.name} on {dataset.source}", "", markdown_table(rows, DETECTION_COLUMNS), ""]
    if rows and rows[0].get("per_class_ap"):
        classes = list(rows[0]["per_class_ap"])
        md += ["## Per-class AP (VOC07 11-point)", "", "| class | " + " | ".join(r["target"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
        for c in classes:
            md.append(f"| {c} | " + " | ".join("-" if np.isnan(r["per_class_ap"][c]) else f"{r['per_class_ap'][c]:.4f}" for r in rows) + " |")
    write_text_atomic(out_dir / "results.md", "\n".join(md) + "\n")
    return rows
