"""What the jobs share: loading a model for a dataset, the calibration split, building targets, evaluating
them side by side and the flat result rows."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from quantship.config import CalibrationSpec, CropMode, PreprocessSpec, PtqSteps, TrtOptions
from quantship.data.datasets import (
    ImageDataset,
    Skipped,
    check_disjoint,
    file_list_hash,
    iter_batches,
    load_dataset,
    select_listed,
    split_calibration,
)
from quantship.data.preprocess import decode_image
from quantship.errors import (
    TARGET_ERRORS,  # re-exported: signoff imports it from here
    ConfigError,
    DataError,
    ModelLoadError,
)
from quantship.evaluate.loop import Batches, TargetRun, run_targets
from quantship.evaluate.tasks import Task
from quantship.manifest import Artifact
from quantship.models.loading import LoadedModel, check_savedmodel_trust, is_model_file, load_model
from quantship.progress import note, track
from quantship.runtime.base import Runner, RunnerOptions
from quantship.runtime.onnxruntime import unavailable_providers
from quantship.runtime.registry import get_runtime
from quantship.targets.base import BuildContext, CalibrationData, Target, needs_calibration
from quantship.targets.post_training import build_searched

log = logging.getLogger("quantship")
REFERENCE_TARGET = "keras-fp32"
# Targets evaluated side by side take turns on every batch: an ONNX Runtime session whose threads spin after
# its run (ORT's default) only burns the cores the next target needs. Measured on 2 loaded cores,
# tflite-fp32 + onnx-fp32 + tflite-int8 (MobileNetV2): 1.14-1.16x the sum of the bare loops with spinning,
# 0.72-0.76x without. Scheduling only: the outputs are the same.
SIDE_BY_SIDE_SESSION = (("session.intra_op.allow_spinning", "0"),)


def load_for(
    model: str,
    weights: str | None,
    preprocess: PreprocessSpec,
    dataset: ImageDataset | None = None,
    trust_savedmodel: bool = False,
) -> LoadedModel:
    """Load ``model`` with its (resolved) preprocessing; a detection registry model gets the dataset's classes."""
    num_classes = None
    if dataset is not None and dataset.task == "detection" and not is_model_file(model):
        num_classes = len(dataset.meta["classes"]) + 1
    return load_model(model, weights, preprocess, num_classes=num_classes, trust_savedmodel=trust_savedmodel)


def check_model_source(model: str, weights: str | None, trust_savedmodel: bool = False) -> None:
    """What loading the model would refuse first, checked without loading it (so that it is reported before
    the data checks, as when the model loaded first): a missing model file, an untrusted SavedModel folder.

    Raises:
        ModelLoadError, ConfigError: As :func:`~quantship.models.loading.load_model` would.
    """
    if is_model_file(model):
        path = Path(model).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model file not found: {path}")
        check_savedmodel_trust(path, trust_savedmodel, "--model")
    elif weights not in (None, "pretrained", "random"):
        check_savedmodel_trust(Path(str(weights)).expanduser(), trust_savedmodel, "--weights")


def check_providers_for(targets: Sequence[Target], providers: Sequence[str], where: str = "--ort-providers") -> None:
    """Refuse, before any work, ONNX Runtime execution providers this machine's onnxruntime lacks when a target
    runs on ONNX Runtime (unknown names were refused when the options were read).

    Raises:
        ConfigError: Naming ``where``, what is missing and what is available.
    """
    if not any(t.spec.backend == "onnx" for t in targets):  # the ONNX Runtime runtime
        return

    missing, available = unavailable_providers(providers)
    if missing:
        raise ConfigError(
            f"{where}: {', '.join(missing)} not available in this onnxruntime build (available: "
            f"{', '.join(available)}); install onnxruntime-gpu for CUDA / TensorRT, or give cpu"
        )


def load_evaluation_data(data: str, labels: str | None = None, allow_missing_images: bool = False) -> ImageDataset:
    """The evaluation dataset. Data without labels (``images:``) is evaluation data only for label-free metrics:
    the caller has refused labelled gates on it before (``check_gate``); here a folder none of whose images
    decodes is refused before any model loads.

    Raises:
        DataError: Missing or malformed data, or an ``images:`` folder without one readable image.
    """
    dataset = load_dataset(data, labels=labels, allow_missing_images=allow_missing_images)
    if not dataset.labelled:
        require_readable_image(dataset, data)
    return dataset


def require_readable_image(dataset: ImageDataset, data: str) -> None:
    """Decode the folder's images in order until one reads (usually the first): a folder of nothing but broken
    files would otherwise load every model and then fail on every chunk.

    Raises:
        DataError: No image of the folder decodes.
    """
    for s in dataset.samples:
        try:
            decode_image(s.read(), s.key)
            return
        except (DataError, OSError, ValueError):
            continue
    raise DataError(
        f"{data}: none of the {len(dataset)} image file(s) could be read as an image; give a folder of JPEG/PNG images"
    )


@dataclass
class CalibrationSource:
    """Where a run's calibration images are drawn from, resolved (and checked) before any heavy work.

    Attributes:
        pool: The images calibration is drawn from when they are not simply the rest of the evaluation data:
            the ``--calib-data`` dataset, or the listed images (``--calib-list``); None otherwise.
        separate: ``pool`` is a dataset of its own (``--calib-data``), not part of the evaluation data.
        info: What manifests and result rows record about the source (list file and its hash).
    """

    pool: ImageDataset | None = None
    separate: bool = False
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def calibration_source(
    calibration: CalibrationSpec, data: ImageDataset | None = None, needed: bool = True
) -> CalibrationSource:
    """Open the calibration data (``calibration.data``, else ``data``) and apply the calibration list.

    Args:
        data: The run's evaluation (or, for convert/calibrate/bench, calibration) data.
        needed: Whether some target calibrates: only then is the count of images checked.

    Raises:
        DataError: An empty calibration folder, a list naming files the data does not hold, or fewer images
            than ``calibration.num_images`` (``--calib-images``).
    """
    if calibration.data:
        pool: ImageDataset | None = load_dataset(calibration.data, option="--calib-data")
        what = f"--calib-data {calibration.data}"
    else:
        pool, what = data, "the data"
    info: dict[str, Any] = {}
    if calibration.list:
        if pool is None:
            raise ConfigError("--calib-list needs calibration data (--data or --calib-data)")
        pool = select_listed(pool, calibration.list)
        info = {"list": str(calibration.list), "list_sha256": file_list_hash(calibration.list)}
        what = f"--calib-list {calibration.list} ({len(pool)} listed images)"
    if needed and pool is not None and len(pool) < calibration.num_images and (calibration.data or calibration.list):
        raise DataError(
            f"{what}: {len(pool)} calibration images, fewer than --calib-images {calibration.num_images}; lower "
            "--calib-images or give more calibration images"
        )
    if not calibration.data and not calibration.list:
        pool = None
    return CalibrationSource(pool, bool(calibration.data), info)


def split_run_data(
    dataset: ImageDataset,
    calibration: CalibrationSpec,
    source: CalibrationSource,
    limit: int | None,
    needed: bool,
) -> tuple[ImageDataset, ImageDataset]:
    """(calibration, evaluation) images of a run, disjoint.

    * ``--calib-data``: every image of ``dataset`` is evaluated (up to ``limit``); calibration is drawn from
      the other dataset, and refused if it shares a file or a file's bytes with the evaluated images.
    * ``--calib-list`` on the evaluation data: calibration is drawn from the listed images, which are never
      evaluated (whether or not a target calibrates, so every run evaluates the same images).
    * otherwise: drawn from ``dataset`` (:func:`~quantship.data.datasets.split_calibration`).

    Raises:
        DataError: Overlapping sources, or no image left to evaluate.
    """
    num, seed = calibration.num_images, calibration.seed
    none = dataset.subset([], f"{dataset.name}-calib")
    if source.pool is None:
        return split_calibration(dataset, num if needed else 0, limit, seed)
    if source.separate:
        evalset = dataset if limit is None else dataset.subset(range(min(limit, len(dataset))))
        if not needed:
            return none, evalset
        calib = draw_calibration(source.pool, num, seed)
        check_disjoint(calib, evalset)
        return calib, evalset
    listed = set(source.pool.positions())
    rest = [i for i, pos in enumerate(dataset.positions()) if pos not in listed]
    if not rest:
        raise DataError(
            f"{dataset.source}: every image is on the calibration list, none is left to evaluate; give the "
            "calibration images with --calib-data"
        )
    evalset = dataset.subset(rest if limit is None else rest[:limit])
    return (draw_calibration(source.pool, num, seed) if needed else none), evalset


@dataclass
class RunData:
    """The calibration and evaluation images of a run, and where calibration came from."""

    calib: ImageDataset
    evalset: ImageDataset
    source: CalibrationSource


def run_data(dataset: ImageDataset, calibration: CalibrationSpec, limit: int | None, needed: bool) -> RunData:
    """Resolve the calibration source and split the images, so that bad calibration input (missing, too few,
    overlapping) is reported before any model is loaded."""
    source = calibration_source(calibration, dataset, needed)
    calib, evalset = split_run_data(dataset, calibration, source, limit, needed)
    return RunData(calib, evalset, source)


def calibration_data(
    calib: ImageDataset,
    loaded: LoadedModel,
    batch_size: int = 8,
    workers: int = 4,
    method: str | None = None,
    percentile: float | None = None,
    source: CalibrationSource | None = None,
) -> CalibrationData:
    """The calibration batches (decoded once on first use, then kept in memory) and their identity: count,
    sample keys, the files' sizes and mtimes, where they came from (and the calibration list's hash).

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
                raise DataError(
                    f"no readable calibration image among {len(calib)} ({skipped[0].reason if skipped else ''})"
                )
            data.read.update(images=sum(len(b) for b in cache), skipped=len(skipped))
        return cache

    info = {
        "num_images": len(calib),
        "data_hash": calib.keys_hash(),
        "listing_hash": calib.listing_hash(),
        "source": calib.source,
        **(source.info if source else {}),
    }
    if method:
        info["method"] = method
    data = CalibrationData(batches, info, percentile, batch_size)
    return data


def draw_calibration(dataset: ImageDataset, num_images: int, seed: int) -> ImageDataset:
    """``num_images`` calibration images drawn (seeded) from a dataset used for calibration only.

    Raises:
        DataError: The dataset holds fewer images than asked for.
    """
    if len(dataset) < num_images:
        raise DataError(
            f"{dataset.source}: {len(dataset)} images, fewer than the {num_images} calibration images asked for "
            "(--calib-images)"
        )
    return dataset if len(dataset) == num_images else split_calibration(dataset, num_images, None, seed)[0]


def draw_listed_calibration(
    dataset: ImageDataset, num_images: int, seed: int, calib_list: str | None = None
) -> tuple[ImageDataset, CalibrationSource]:
    """Calibration images of a dataset used for calibration only (``convert``, ``calibrate``, ``bench``),
    drawn from the files ``calib_list`` names when given; and their source, for the manifest.

    Raises:
        DataError: A list naming missing files, or fewer images than asked for.
    """
    source = calibration_source(CalibrationSpec(num_images=num_images, seed=seed, list=calib_list), dataset)
    return draw_calibration(source.pool or dataset, num_images, seed), source


@dataclass(frozen=True)
class RunSettings:
    """How a run splits its images and builds its targets (what eval, diff and sign-off hand :func:`prepare_run`
    beside the model and the data).

    Attributes:
        calibration: Where the calibration images come from and how they are read.
        limit: Evaluation images at most (None: all).
        runner_options: Threads and execution providers of the runners.
        workers: Decoding threads.
        trt: TensorRT build options.
        ptq: Post-training steps of the targets with int8 weights (they read the calibration images too).
    """

    calibration: CalibrationSpec
    limit: int | None
    runner_options: RunnerOptions
    workers: int
    trt: TrtOptions = TrtOptions()
    ptq: PtqSteps = PtqSteps()


def prepare_run(
    loaded: LoadedModel,
    targets: Sequence[Target],
    dataset: ImageDataset,
    out_dir: Path,
    settings: RunSettings,
    split: RunData | None = None,
) -> tuple[BuildContext, ImageDataset, ImageDataset]:
    """Split calibration/evaluation images (calibration only when a target needs it) and make the context
    that builds every target's artifact.

    Args:
        split: The images as :func:`run_data` split them beforehand; split here from ``settings.calibration``
            when None.
    """
    s = settings
    needs_calib = bool(needs_calibration(targets, s.trt, s.ptq))
    if split is None:
        split = run_data(dataset, s.calibration, s.limit, needs_calib)
    calib, evalset = split.calib, split.evalset
    ctx = BuildContext(
        loaded,
        out_dir,
        calibration=calibration_data(
            calib, loaded, s.calibration.batch_size, s.workers, percentile=s.calibration.percentile,
            source=split.source,
        )
        if needs_calib
        else None,
        runner_options=s.runner_options,
        trt=s.trt,
        log_path=out_dir / "convert.log",
        ptq=s.ptq,
    )  # fmt: skip
    return ctx, calib, evalset


def remove_artifact(artifact: Artifact | None) -> None:
    """Delete an artifact and its manifest (a target that was built but cannot run leaves nothing behind)."""
    if artifact is None:
        return
    for path in (artifact.path, artifact.manifest_path):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def build_targets(ctx: BuildContext, targets: Sequence[Target]) -> tuple[dict[str, Artifact | None], dict[str, str]]:
    """Every target's artifact (None for in-memory runtimes), built or reused through its manifest.

    A target that fails to build is reported, not fatal: returns (artifacts of the targets that built, error
    message per target that did not). An error that concerns the whole run (a missing dependency, bad data)
    still stops it.
    """
    artifacts: dict[str, Artifact | None] = {}
    failed: dict[str, str] = {}
    for t in track(targets, total=len(targets), desc="convert"):
        log.info("building %s", t.name)
        # A converter that crashes the process (a segmentation fault in native code) then leaves a last line
        # naming its target, where no exception handler could.
        if t.build is not None:
            note(f"{t.name}: building")
        try:
            artifacts[t.name] = build_searched(ctx, t)
        except TARGET_ERRORS as exc:
            failed[t.name] = str(exc)
    return artifacts, failed


def side_by_side(ctx: BuildContext, targets: Sequence[Target]) -> BuildContext:
    """The context whose runners take turns on each batch: ONNX Runtime threads do not spin between runs
    (:data:`SIDE_BY_SIDE_SESSION`) when more than one target runs."""
    if len(targets) < 2:
        return ctx
    options = ctx.runner_options
    config = options.session_config + SIDE_BY_SIDE_SESSION
    return dataclasses.replace(ctx, runner_options=dataclasses.replace(options, session_config=config))


def evaluate_targets(
    ctx: BuildContext,
    targets: Sequence[Target],
    artifacts: dict[str, Artifact | None],
    batches: Batches,
    task: Task,
    make_runner: Callable[[Target, BuildContext, Artifact | None], Runner] | None = None,
) -> dict[str, TargetRun]:
    """Run every target on the same decoded, preprocessed batches (one decode per image for all targets).

    A target whose runner cannot load its artifact or fails while running gets a :class:`TargetRun` with its
    ``error`` set, and its artifact is removed; the others are evaluated.

    Args:
        make_runner: How a target's runner is made (``eval --remote``: on the device); default
            :meth:`Target.make_runner`.
    """
    ctx = side_by_side(ctx, targets)
    runners, failed = {}, {}
    for t in targets:
        try:
            runner = make_runner(t, ctx, artifacts[t.name]) if make_runner else t.make_runner(ctx, artifacts[t.name])
            runners[t.name] = runner.activate()
        except TARGET_ERRORS as exc:
            failed[t.name] = TargetRun(t.name, error=str(exc))
    try:
        runs = run_targets(runners, batches, ctx.loaded.preprocess, task)
    finally:
        for r in runners.values():
            r.deactivate()
    runs.update(failed)
    for name, run in runs.items():
        if run.error and make_runner is None:  # an artifact another machine cannot run may still be good here
            remove_artifact(artifacts.get(name))
    return {t.name: runs[t.name] for t in targets}


def artifact_fields(artifact: Artifact | None) -> dict[str, Any]:
    return {
        "artifact": str(artifact.path) if artifact else None,
        "manifest": str(artifact.manifest_path) if artifact else None,
        "size_mb": artifact.manifest["size_bytes"] / 1e6 if artifact else None,
    }


def target_fields(target: Target) -> dict[str, Any]:
    fields = {"target": target.name, "runtime": target.spec.backend, "precision": target.spec.precision.value}
    if target.session_config:
        fields["session_config"] = dict(target.session_config)
    return fields


def runtime_fields(target: Target, options: RunnerOptions) -> dict[str, Any]:
    """How a target was run: CPU threads, and what its runtime adds (ONNX Runtime: its execution providers)."""
    return {"threads": options.threads, **get_runtime(target.spec.backend).row_fields(options)}


@dataclass
class Evaluated:
    """What building and running the targets left (what :func:`evaluated_rows` turns into rows).

    Attributes:
        runs: Target name -> its run (its ``error`` set when it failed to run).
        artifacts: Target name -> its artifact.
        failures: Target name -> why it failed to build.
        skipped: The images no decoder could read.
    """

    runs: dict[str, TargetRun]
    artifacts: dict[str, Artifact | None]
    failures: dict[str, str]
    skipped: Sequence[Skipped] = ()


def evaluated_rows(
    task: Task,
    targets: Sequence[Target],
    evaluated: Evaluated,
    ctx: BuildContext,
    dataset: ImageDataset,
    extra: dict[str, Any] | None = None,
    reference: str = REFERENCE_TARGET,
) -> list[dict[str, Any]]:
    """One flat row per target: the task's metrics, differences and agreement against the reference target; a
    target that failed to build or run gets a row with ``status: failed`` and its error.

    Args:
        ctx: The context the targets were built in: its model, and the runner options the rows record.
    """
    runs, artifacts, skipped = evaluated.runs, evaluated.artifacts, evaluated.skipped
    loaded, options, failures = ctx.loaded, ctx.runner_options, evaluated.failures
    errors = {**failures, **{name: run.error for name, run in runs.items() if run.error}}
    ok = [t for t in targets if t.name not in errors]
    arrays = {t.name: runs[t.name].arrays for t in ok}
    metrics = {t.name: task.evaluate(arrays[t.name], arrays[t.name].get("keys", [])) for t in ok}
    ref = reference if reference in metrics else (ok[0].name if ok else None)
    rows = []
    for t in targets:
        row: dict[str, Any] = {"model": loaded.name, **target_fields(t), "dataset": dataset.source, "task": task.name}
        if t.name in errors:
            rows.append({**row, "status": "failed", "error": errors[t.name], "images": 0, **(extra or {})})
            continue
        a = arrays[t.name]
        rows.append(
            {
                **row,
                "status": "ok",
                "images": task.count(a),
                "skipped": len(skipped),
                "missing_images": dataset.meta.get("missing_images", 0),
                "nonfinite_images": runs[t.name].nonfinite_images,
                **task.row(metrics[t.name], metrics[ref]),
                "reference": ref,
                **task.agreement(a, arrays[ref]),
                "latency_ms": runs[t.name].latency_ms,
                "where": "local",
                **runtime_fields(t, options),
                **artifact_fields(artifacts.get(t.name)),
                "weights": loaded.weights,
                "preprocess_hash": loaded.preprocess.hash(),
                "eval_data_hash": dataset.keys_hash(),
                "crops": loaded.preprocess.crops.value,
                **(extra or {}),
            }
        )
    return rows


def nonfinite_error(rows: Sequence[dict[str, Any]], allowed: bool, option: str = "--allow-nonfinite") -> str | None:
    """One line naming the targets whose outputs held NaN or inf on some images (None when there are none, or
    when the user allowed them): such a target's numbers are not a measurement of the model."""
    bad = [r for r in rows if r.get("nonfinite_images")]
    if not bad or allowed:
        return None
    what = ", ".join(f"{r.get('model', '')} {r['target']} ({r['nonfinite_images']} of {r['images']})" for r in bad)
    return (
        f"error: NaN or inf outputs on some images (scored as wrong) from: {what}; the model or its conversion is "
        f"broken. Pass {option} to accept such a result"
    )


def check_readable(evaluated: int, skipped: Sequence[Skipped]) -> None:
    """Refuse a run in which no image could be read: its metrics would be NaN over 0 images.

    Raises:
        DataError: Naming the first unreadable image and why.
    """
    if evaluated == 0 and skipped:
        raise DataError(
            f"none of the {len(skipped)} evaluation images could be read (e.g. {skipped[0].key}: {skipped[0].reason}); "
            "they are listed in skipped.txt"
        )


def failure_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per failed target, for the end of a job's output."""
    return [f"FAILED {r['target']}: {r['error']}" for r in rows if r.get("status") == "failed"]
