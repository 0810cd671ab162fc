"""What the jobs share: loading a model for a dataset, the calibration split, building targets, evaluating
them side by side and the flat result rows."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from quantship.config import CalibrationSpec, CropMode, PreprocessSpec, TrtOptions
from quantship.data.datasets import ImageDataset, Skipped, iter_batches, split_calibration
from quantship.errors import CalibrationError, ConversionError, DataError, MissingDependencyError, RuntimeBackendError
from quantship.evaluate.loop import TargetRun, run_targets
from quantship.evaluate.tasks import Task
from quantship.manifest import Artifact
from quantship.models.loading import LoadedModel, is_model_file, load_model
from quantship.progress import track
from quantship.runtime.base import RunnerOptions
from quantship.targets import BuildContext, CalibrationData, Target, needs_calibration

log = logging.getLogger("quantship")
REFERENCE_TARGET = "keras-fp32"


def load_for(
    model: str, weights: str | None, preprocess: PreprocessSpec, dataset: ImageDataset | None = None
) -> LoadedModel:
    """Load ``model`` with its (resolved) preprocessing; a detection registry model gets the dataset's classes."""
    num_classes = None
    if dataset is not None and dataset.task == "detection" and not is_model_file(model):
        num_classes = len(dataset.meta["classes"]) + 1
    return load_model(model, weights, preprocess, num_classes=num_classes)


def calibration_data(
    calib: ImageDataset,
    loaded: LoadedModel,
    batch_size: int = 8,
    workers: int = 4,
    method: str | None = None,
    percentile: float | None = None,
) -> CalibrationData:
    """The calibration batches (decoded once on first use, then kept in memory) and their identity.

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
        return cache

    info = {"num_images": len(calib), "data_hash": calib.keys_hash(), "source": calib.source}
    if method:
        info["method"] = method
    return CalibrationData(batches, info, percentile, batch_size)


def draw_calibration(dataset: ImageDataset, num_images: int, seed: int) -> ImageDataset:
    """``num_images`` calibration images drawn (seeded) from a dataset used for calibration only.

    Raises:
        DataError: The dataset holds fewer images than asked for.
    """
    if len(dataset) < num_images:
        raise DataError(
            f"{dataset.source}: {len(dataset)} images, fewer than the {num_images} calibration images asked for"
        )
    return dataset if len(dataset) == num_images else split_calibration(dataset, num_images, None, seed)[0]


def prepare_run(
    loaded: LoadedModel,
    targets: Sequence[Target],
    dataset: ImageDataset,
    calibration: CalibrationSpec,
    limit: int | None,
    out_dir: Path,
    runner_options: RunnerOptions,
    workers: int,
    trt: TrtOptions = TrtOptions(),
) -> tuple[BuildContext, ImageDataset, ImageDataset]:
    """Split calibration/evaluation images (calibration only when a target needs it) and make the context
    that builds every target's artifact."""
    needs_calib = bool(needs_calibration(targets, trt))
    calib, evalset = split_calibration(dataset, calibration.num_images if needs_calib else 0, limit, calibration.seed)
    ctx = BuildContext(
        loaded,
        out_dir,
        calibration=calibration_data(calib, loaded, calibration.batch_size, workers, percentile=calibration.percentile)
        if needs_calib
        else None,
        runner_options=runner_options,
        trt=trt,
        log_path=out_dir / "convert.log",
    )
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
        try:
            artifacts[t.name] = t.build(ctx, t.spec)
        except TARGET_ERRORS as exc:
            failed[t.name] = str(exc)
    return artifacts, failed


# Errors that concern one target (its conversion, its runtime): that target fails, the others go on.
TARGET_ERRORS = (ConversionError, RuntimeBackendError, CalibrationError, MissingDependencyError)


def evaluate_targets(
    ctx: BuildContext,
    targets: Sequence[Target],
    artifacts: dict[str, Artifact | None],
    dataset: ImageDataset,
    task: Task,
    batch_size: int = 8,
    workers: int = 4,
    skipped: list[Skipped] | None = None,
) -> dict[str, TargetRun]:
    """Run every target on the same decoded, preprocessed batches (one decode per image for all targets).

    A target whose runner cannot load its artifact or fails while running gets a :class:`TargetRun` with its
    ``error`` set, and its artifact is removed; the others are evaluated.
    """
    runners, failed = {}, {}
    for t in targets:
        try:
            runners[t.name] = t.make_runner(ctx, artifacts[t.name]).activate()
        except TARGET_ERRORS as exc:
            failed[t.name] = TargetRun(t.name, error=str(exc))
    try:
        runs = run_targets(runners, dataset, ctx.loaded.preprocess, task, batch_size, workers, skipped)
    finally:
        for r in runners.values():
            r.deactivate()
    runs.update(failed)
    for name, run in runs.items():
        if run.error:
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
    """How a target was run: CPU threads of LiteRT / ONNX Runtime and ONNX Runtime's execution providers."""
    from quantship.runtime.onnxruntime import provider_names

    fields: dict[str, Any] = {"threads": options.threads}
    if target.spec.backend == "onnx":
        fields["providers"] = provider_names(options.providers)
    return fields


def evaluated_rows(
    task: Task,
    targets: Sequence[Target],
    runs: dict[str, TargetRun],
    artifacts: dict[str, Artifact | None],
    failures: dict[str, str],
    loaded: LoadedModel,
    dataset: ImageDataset,
    skipped: Sequence[Skipped],
    options: RunnerOptions,
    extra: dict[str, Any] | None = None,
    reference: str = REFERENCE_TARGET,
) -> list[dict[str, Any]]:
    """One flat row per target: the task's metrics, differences and agreement against the reference target; a
    target that failed to build or run gets a row with ``status: failed`` and its error."""
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
                **task.row(metrics[t.name], metrics[ref]),
                "reference": ref,
                **task.agreement(a, arrays[ref]),
                "latency_ms": runs[t.name].latency_ms,
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


def failure_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per failed target, for the end of a job's output."""
    return [f"FAILED {r['target']}: {r['error']}" for r in rows if r.get("status") == "failed"]
