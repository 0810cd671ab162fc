"""What the jobs share: loading a model for a dataset, the calibration split, building targets, evaluating
them side by side and the flat result rows."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from quantship.config import CalibrationSpec, CropMode, PreprocessSpec, PtqSteps, TrtOptions
from quantship.data.datasets import ImageDataset, Skipped, iter_batches, split_calibration
from quantship.errors import DataError
from quantship.evaluate.loop import TargetRun, run_targets
from quantship.evaluate.tasks import Task
from quantship.manifest import Artifact
from quantship.models.loading import LoadedModel, is_model_file, load_model
from quantship.progress import track
from quantship.runtime.base import RunnerOptions
from quantship.targets import QUANTIZED_WEIGHTS, BuildContext, CalibrationData, Target, needs_calibration

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
    calib: ImageDataset, loaded: LoadedModel, batch_size: int = 8, workers: int = 4, method: str | None = None
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
    return CalibrationData(batches, info)


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
    ptq: PtqSteps = PtqSteps(),
) -> tuple[BuildContext, ImageDataset, ImageDataset]:
    """Split calibration/evaluation images (calibration only when a target needs it) and make the context
    that builds every target's artifact."""
    needs_calib = bool(needs_calibration(targets, trt)) or (
        ptq.active and any(t.spec.precision in QUANTIZED_WEIGHTS for t in targets)
    )
    calib, evalset = split_calibration(dataset, calibration.num_images if needs_calib else 0, limit, calibration.seed)
    ctx = BuildContext(
        loaded,
        out_dir,
        calibration=calibration_data(calib, loaded, workers=workers) if needs_calib else None,
        runner_options=runner_options,
        trt=trt,
        log_path=out_dir / "convert.log",
        ptq=ptq,
    )
    return ctx, calib, evalset


def build_targets(ctx: BuildContext, targets: Sequence[Target]) -> dict[str, Artifact | None]:
    """Every target's artifact (None for in-memory runtimes), built or reused through its manifest."""
    artifacts = {}
    for t in track(targets, total=len(targets), desc="convert"):
        log.info("building %s", t.name)
        artifacts[t.name] = t.build(ctx, t.spec)
    return artifacts


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
    """Run every target on the same decoded, preprocessed batches (one decode per image for all targets)."""
    runners = {t.name: t.make_runner(ctx, artifacts[t.name]) for t in targets}
    active = []
    try:
        for r in runners.values():
            active.append(r.activate())
        return run_targets(runners, dataset, ctx.loaded.preprocess, task, batch_size, workers, skipped)
    finally:
        for r in active:
            r.deactivate()


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


@dataclass
class EvaluatedTarget:
    """One target's stored arrays and how it was run, ready to become a row."""

    target: Target
    arrays: dict[str, np.ndarray]
    latency_ms: float | None
    artifact: Artifact | None


def result_rows(
    task: Task,
    evaluated: Sequence[EvaluatedTarget],
    loaded: LoadedModel,
    dataset: ImageDataset,
    skipped: Sequence[Skipped],
    extra: dict[str, Any] | None = None,
    reference: str = REFERENCE_TARGET,
) -> list[dict[str, Any]]:
    """One flat row per target: the task's metrics, differences and agreement against the reference target."""
    metrics = [task.evaluate(e.arrays, e.arrays.get("keys", [])) for e in evaluated]
    ref_i = next((i for i, e in enumerate(evaluated) if e.target.name == reference), 0)
    ref = evaluated[ref_i]
    rows = []
    for e, m in zip(evaluated, metrics):
        rows.append(
            {
                "model": loaded.name,
                **target_fields(e.target),
                "dataset": dataset.source,
                "task": task.name,
                "images": task.count(e.arrays),
                "skipped": len(skipped),
                **task.row(m, metrics[ref_i]),
                "reference": ref.target.name,
                **task.agreement(e.arrays, ref.arrays),
                "latency_ms": e.latency_ms,
                **artifact_fields(e.artifact),
                "weights": loaded.weights,
                "preprocess_hash": loaded.preprocess.hash(),
                "eval_data_hash": dataset.keys_hash(),
                "crops": loaded.preprocess.crops.value,
                **(extra or {}),
            }
        )
    return rows
