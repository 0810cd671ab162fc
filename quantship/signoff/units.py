"""Sign-off units: keys, chunks, rows and verdicts, and the local executor (every unit in this process).

Resumable by construction. Each (model, target) unit is evaluated in chunks of images; every finished chunk is
written atomically to ``state/`` before the next starts, and a finished unit appends its row to
``signoff.jsonl`` (fsync'd). A run started again skips every stored chunk and row, so a kill at any moment
loses at most the chunk in flight and recomputes nothing that was stored. A unit's key holds everything its
numbers depend on (the content of every input file, the dataset listing, preprocessing, chunking, batch size,
calibration settings, runtime options and the versions of the tools that compute them), so a stored result is
only ever reused for exactly the same inputs. Verdicts and reports cover exactly the current plan; results of
other keys stay on disk and are listed as not in this plan. One run at a time holds the output folder.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from quantship.data.datasets import ImageDataset, Skipped
from quantship.errors import DataError
from quantship.evaluate.loop import Batches, run_targets
from quantship.evaluate.tasks import ARRAYS_VERSION, Task, concat, make_task
from quantship.evaluate.verdicts import judge_target
from quantship.fileio import (
    atomic_path,
    sha256_file,
    sha256_json,
)
from quantship.manifest import Artifact
from quantship.models.loading import is_model_file, weights_file
from quantship.progress import note, track
from quantship.runtime.base import RunnerOptions
from quantship.runtime.registry import get_runtime, tool_versions
from quantship.signoff.plan import PlanModel, SignoffPlan
from quantship.targets import BuildContext, Target, get_target, needs_calibration
from quantship.targets.post_training import build_searched
from quantship.targets.run import (
    TARGET_ERRORS,
    RunData,
    RunSettings,
    load_evaluation_data,
    load_for,
    prepare_run,
    remove_artifact,
    run_data,
    runtime_fields,
    target_fields,
)

log = logging.getLogger("quantship")


# ------------------------------------------------------------------------------------------ unit keys


def _file_identity(path: str | Path | None) -> str | None:
    return sha256_file(path)[:16] if path and Path(path).exists() else None


def model_identity(entry: PlanModel) -> dict[str, Any]:
    """The content hashes of a plan model's files (model file, or the registry model's weights file, built-in
    weights included): replacing a file at the same path changes the key."""
    if is_model_file(entry.name):
        return {"model_sha256": _file_identity(entry.name)}
    if entry.weights == "random":
        return {"weights_sha256": "random"}
    return {"weights_sha256": _file_identity(weights_file(entry.name, entry.weights))}


def unit_key(plan: SignoffPlan, entry: PlanModel, target: str, inputs: dict[str, Any]) -> str:
    """Identity of one (model, target) evaluation: what its numbers depend on, nothing else.

    ``inputs`` holds what is read from disk once per model: file contents, the dataset listings (evaluation and
    calibration images), the resolved preprocessing and the tool versions.
    """
    return sha256_json(
        {
            "model": dataclasses.asdict(entry),
            "target": target,
            "data": plan.data,
            "limit": plan.limit,
            "chunk_images": plan.chunk_images,
            "batch_size": plan.batch_size,
            "calibration": dataclasses.asdict(plan.calibration),
            "tensorrt": dataclasses.asdict(plan.tensorrt),
            "threads": plan.threads,
            "ort_providers": list(plan.ort_providers),
            **inputs,
            **({"post_training": plan.post_training.describe()} if plan.post_training.active else {}),
            **_remote_identity(plan, target),
        }
    )[:16]


def _remote_identity(plan: SignoffPlan, target: str) -> dict[str, Any]:
    """A target run on a device (``remote:``) is another unit than the same target run here; an in-memory target
    (the Keras reference) runs here either way, and a plan without ``remote`` keeps its keys."""

    if plan.remote is None or not get_runtime(get_target(target).spec.backend).suffixes:
        return {}
    return {"remote": {"url": plan.remote.url, "python": plan.remote.python}}


def unit_inputs(
    plan: SignoffPlan, entry: PlanModel, preprocess: Any, evalset: ImageDataset, calib: ImageDataset
) -> dict:
    return {
        "files": {
            **model_identity(entry),
            "anchors_sha256": _file_identity(plan.anchors),
            "labels_sha256": _file_identity(plan.labels),
        },
        "eval_listing": evalset.listing_hash(),
        "calibration_listing": calib.listing_hash(),
        "preprocess": preprocess.hash(),
        "tools": tool_versions(),  # every distribution the runtime registry lists (decoders included)
        # What a chunk stores per image (the probability vectors the distances need came with layout 2): a chunk
        # of an older layout is never read as if it held them.
        "task_arrays": ARRAYS_VERSION,
    }


# ---------------------------------------------------------------------------------------------- chunks


def _chunk_path(state: Path, start: int) -> Path:
    return state / f"chunk-{start:08d}.npz"


def _save_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _read_chunk(path: Path, keys: list[str] | None = None) -> dict[str, np.ndarray] | None:
    """A stored chunk, or None (with a warning, the file removed) when it is truncated, corrupt or holds
    other images than ``keys``: that chunk alone is computed again."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        reason = f"unreadable ({type(exc).__name__}: {exc})"
    else:
        if "keys" not in arrays:
            reason = "it holds no image keys"
        elif keys is not None and list(arrays["keys"]) != [k for k in keys if k not in set(arrays.get("skipped", []))]:
            reason = "it holds other images than this chunk's"
        else:
            return arrays
    log.warning("%s: discarding the stored chunk, %s; it will be computed again", path, reason)
    note(f"warning: {path}: discarding the stored chunk, {reason}; it will be computed again")
    path.unlink(missing_ok=True)
    return None


def load_chunks(state: Path) -> dict[str, np.ndarray]:
    """Every stored chunk of a unit, joined in image order."""
    parts = [_read_chunk(p) for p in sorted(Path(state).glob("chunk-*.npz"))]
    if any(p is None for p in parts):
        raise DataError(f"{state}: a stored chunk became unreadable; run the sign-off again to recompute it")
    return concat(parts)


def chunk_spans(plan: SignoffPlan, evalset: ImageDataset) -> list[tuple[int, int]]:
    """The (start, end) image ranges a unit is stored in."""
    return [(s, min(s + plan.chunk_images, len(evalset))) for s in range(0, len(evalset), plan.chunk_images)]


def todo_spans(plan: SignoffPlan, evalset: ImageDataset, state: Path) -> list[tuple[int, int]]:
    """The chunks of a unit not yet on disk (a stored chunk is verified; a damaged one is discarded)."""
    keys = [s.key for s in evalset.samples]
    return [
        (s, e)
        for s, e in chunk_spans(plan, evalset)
        if not (_chunk_path(state, s).is_file() and _read_chunk(_chunk_path(state, s), keys[s:e]))
    ]


@dataclass(frozen=True)
class Chunk:
    """Images ``start:end`` of one unit, stored in the unit's folder ``state`` (what an executor schedules).

    Attributes:
        warmup_batches: Leading batches left out of the latency (the first chunk a process runs warms up).
    """

    state: Path
    start: int
    end: int
    warmup_batches: int = 0


def evaluate_chunk(
    plan: SignoffPlan,
    runner: Any,
    target: Target,
    preprocess: Any,
    evalset: ImageDataset,
    task: Task,
    chunk: Chunk,
) -> None:
    """Evaluate a chunk's images on an active runner and store them, atomically (every executor stores its chunks
    through here).

    Raises:
        UnitFailed: The runner failed on an image batch.
    """
    skipped: list[Skipped] = []
    batches = Batches(evalset.subset(range(chunk.start, chunk.end)), plan.batch_size, plan.workers, skipped)
    run = run_targets(
        {target.name: runner}, batches, preprocess, task, warmup_batches=chunk.warmup_batches,
        desc=f"chunk {chunk.start}",
    )[target.name]  # fmt: skip
    if run.error:
        raise UnitFailed(run.error)
    _save_chunk(
        _chunk_path(chunk.state, chunk.start),
        {
            **(run.arrays or task.empty()),
            "seconds": np.asarray([run.seconds]),
            "timed_images": np.asarray([run.timed_images]),
            "nonfinite_images": np.asarray([run.nonfinite_images]),
            "skipped": np.asarray([s.key for s in skipped], dtype=str),
        },
    )


@dataclass
class ModelUnits:
    """What every unit of one plan model shares in the local executor.

    Attributes:
        ctx: The context that builds the model's targets.
        evalset: The evaluation images.
        task: Scores the model's outputs.
        make_runner: ``make_runner(target, ctx, artifact)`` makes the runners when given (a plan's ``remote:``
            device).
    """

    plan: SignoffPlan
    ctx: BuildContext
    evalset: ImageDataset
    task: Task
    make_runner: Any = None


def _evaluate_unit(units: ModelUnits, target: Target, artifact: Artifact | None, state: Path) -> None:
    """Evaluate one target chunk by chunk, skipping chunks already on disk (verified)."""
    plan, ctx, make_runner = units.plan, units.ctx, units.make_runner
    todo = todo_spans(plan, units.evalset, state)
    if not todo:
        return
    runner = make_runner(target, ctx, artifact) if make_runner else target.make_runner(ctx, artifact)
    state.mkdir(parents=True, exist_ok=True)
    with runner:
        for k, (start, end) in enumerate(track(todo, total=len(todo), desc=f"{ctx.loaded.name} {target.name}")):
            # The first batch of the first chunk this process runs is warm-up, left out of the latency.
            chunk = Chunk(state, start, end, 0 if k else 1)
            evaluate_chunk(plan, runner, target, ctx.loaded.preprocess, units.evalset, units.task, chunk)


def stored_intact(row: dict[str, Any] | None, plan: SignoffPlan, evalset: ImageDataset) -> bool:
    """A unit is done when its row ran and every chunk it rests on is still on disk and readable (a damaged
    chunk is discarded here, so the unit recomputes that chunk alone)."""
    if not row or row.get("status") != "ok":
        return False
    state, keys = Path(row["state"]), [s.key for s in evalset.samples]
    return all(
        _chunk_path(state, s).is_file() and _read_chunk(_chunk_path(state, s), keys[s:e]) is not None
        for s, e in chunk_spans(plan, evalset)
    )


class UnitFailed(Exception):
    """A target's runner failed on an image batch: that unit fails, the others go on."""


def unit_row(
    plan: SignoffPlan, model: str, target: Target, key: str, state: Path, artifact: Artifact | None, task: Task
) -> dict:
    d = load_chunks(state)
    timed = int(d["timed_images"].sum())
    return {
        "model": model,
        **target_fields(target),
        "status": "ok",
        "dataset": plan.data,
        "task": task.name,
        "images": task.count(d),
        "skipped": int(d["skipped"].size),
        "nonfinite_images": int(d["nonfinite_images"].sum()) if "nonfinite_images" in d else 0,
        **task.fields(task.evaluate(d, d["keys"])),
        "latency_ms": 1e3 * float(d["seconds"].sum()) / timed if timed else None,
        "where": "local",
        **runtime_fields(target, RunnerOptions(threads=plan.threads, providers=plan.ort_providers)),
        "unit_key": key,
        "state": str(state),
        "artifact": str(artifact.path) if artifact else None,
        "manifest": str(artifact.manifest_path) if artifact else None,
    }


def check_readable(row: dict[str, Any], target: Target, state: Path) -> None:
    """A unit that could read none of its images is an error of the data, not a result.

    Raises:
        DataError: Every evaluation image of the unit was skipped.
    """
    if not row["images"] and row["skipped"]:
        raise DataError(f"none of the {row['skipped']} evaluation images could be read ({target.name}); see {state}")


def failed_row(model: str, target: Target, key: str, error: str) -> dict[str, Any]:
    return {"model": model, **target_fields(target), "status": "failed", "error": error, "unit_key": key}


# ---------------------------------------------------------------------------------------------- verdicts

AGREEMENT_FIELDS = ("agreement_top1", "agreement_top5", "mean_l1", "mean_kl")


def with_agreement(plan: SignoffPlan, rows: list[dict[str, Any]], task: Task) -> list[dict[str, Any]]:
    """The rows with each target's agreement and distances to its model's reference row (label-free: every
    target gets them, labelled data or not), computed from the stored chunks after all units ran, since a unit
    runs without its reference."""
    refs = {r["model"]: r for r in rows if r["target"] == plan.reference and r.get("status") == "ok"}
    out = []
    for r in rows:
        ref = refs.get(r["model"])
        if r.get("status") == "ok" and ref is not None:
            mine = load_chunks(Path(r["state"]))
            theirs = mine if ref is r else load_chunks(Path(ref["state"]))
            r = {**r, **task.agreement(mine, theirs)}
        out.append(r)
    return out


def verdicts(plan: SignoffPlan, rows: list[dict[str, Any]], task: Task) -> list[dict[str, Any]]:
    """Gate every (model, target) row of the plan against its model's reference row."""
    out = []
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["target"]] = r
    for model, targets in by_model.items():
        ref = targets.get(plan.reference)
        for name, row in targets.items():
            if name == plan.reference:
                continue
            out += judge_target(
                plan.gates,
                task,
                model,
                name,
                plan.reference,
                (row, ref),
                lambda row=row, ref=ref: (load_chunks(Path(row["state"])), load_chunks(Path(ref["state"]))),
                samples=plan.bootstrap_samples,
                confidence=plan.confidence,
                min_images=plan.min_images,
            )
    return out


# ---------------------------------------------------------------------------------------------- the run


def plan_data(plan: SignoffPlan, targets: list[Target]) -> tuple[ImageDataset, RunData]:
    """The plan's evaluation data (refused when unlabelled) and its calibration/evaluation split, calibration
    drawn from ``calibration: {data, list}`` when given; both checked before any model is loaded (every executor
    reads the data through here: a Ray worker reads it by path)."""
    dataset = load_evaluation_data(plan.data, plan.labels, plan.allow_missing_images)
    return dataset, run_data(
        dataset, plan.calibration, plan.limit, bool(needs_calibration(targets, plan.tensorrt, plan.post_training))
    )


@dataclass
class SignoffJob:
    """What every executor of one run shares: the plan, its targets (reference first), the dataset and its
    calibration / evaluation split, the output folder."""

    plan: SignoffPlan
    targets: list[Target]
    dataset: ImageDataset
    split: RunData  # calibration and evaluation images
    out_dir: Path

    @property
    def evalset(self) -> ImageDataset:
        return self.split.evalset


@dataclass
class ModelWork:
    """One plan model's units still to run: its key per target and the targets whose row is not stored."""

    entry: PlanModel
    preprocess: Any
    keys: dict[str, str]
    todo: list[Target]


class Executor(Protocol):
    """Runs the units of a sign-off and hands back each unit's row as it finishes (stored by the caller, which
    holds the output folder). Whatever the executor, artifacts are built through :func:`model_context`, chunks
    stored by :func:`evaluate_chunk` and rows made by :func:`unit_row` or :func:`failed_row`, so the numbers do
    not depend on where they were computed."""

    name: str
    description: str

    def run(self, job: SignoffJob, work: list[ModelWork]) -> Iterator[dict[str, Any]]: ...

    def record(self) -> dict[str, Any]:
        """What the report says about the run: the executor, nodes, workers, retries, phase timings."""
        ...


def model_context(
    plan: SignoffPlan,
    targets: list[Target],
    dataset: ImageDataset,
    split: RunData,
    out_dir: Path,
    entry: PlanModel,
    preprocess: Any,
) -> tuple[BuildContext, Task]:
    """Load one plan model and make the context that builds all its targets (one export, one statistics pass
    shared by every target) and the task that scores its outputs (every executor builds through here)."""
    loaded = load_for(entry.name, entry.weights, preprocess, dataset, trust_savedmodel=plan.trust_savedmodel)
    task = make_task(dataset, loaded, plan.anchors)
    options = RunnerOptions(threads=plan.threads, providers=plan.ort_providers)
    settings = RunSettings(plan.calibration, plan.limit, options, plan.workers, plan.tensorrt, plan.post_training)
    ctx, _, _ = prepare_run(loaded, targets, dataset, out_dir, settings, split)
    return ctx, task


@dataclass
class LocalExecutor:
    """Every unit in this process, one after the other: model by model, each target built then evaluated."""

    name: str = "local"
    description: str = "this process"
    timings: dict[str, float] = field(default_factory=lambda: {"build_s": 0.0, "evaluate_s": 0.0})
    # A plan's ``remote:`` device (set by the job that opened its session): how runners and engines are made
    # there, and the ``remote`` object of the rows that ran there (target name -> fields).
    make_runner: Any = None
    engine_builder: Any = None
    remote_fields: Any = None
    make_bench_worker: Any = None  # the report's bench pass on the device (``BenchConfig -> BenchWorker``)

    def run(self, job: SignoffJob, work: list[ModelWork]) -> Iterator[dict[str, Any]]:
        for w in work:
            t0 = time.perf_counter()
            ctx, task = model_context(job.plan, job.targets, job.dataset, job.split, job.out_dir, w.entry, w.preprocess)
            ctx.engine_builder = self.engine_builder
            self.timings["build_s"] += time.perf_counter() - t0
            try:
                for t in w.todo:
                    units = ModelUnits(job.plan, ctx, job.evalset, task, self.make_runner)
                    row = _run_unit(units, t, w.keys[t.name], job.out_dir, self.timings)
                    yield self._mark(row)
            finally:
                ctx.close()

    def _mark(self, row: dict[str, Any]) -> dict[str, Any]:
        fields = self.remote_fields(row["target"]) if self.remote_fields else None
        if fields is not None and row.get("status") == "ok":
            return {**row, "where": "remote", "remote": fields}
        return row

    def record(self) -> dict[str, Any]:
        return {"executor": self.name, "nodes": 1, "workers": 1, "timings": dict(self.timings)}


def unit_state(out_dir: Path, model: str, target: str, key: str) -> Path:
    """The folder of a unit's chunks."""
    return out_dir / "state" / f"{model}-{target}-{key}"


def _run_unit(units: ModelUnits, t: Target, key: str, out_dir: Path, timings: dict[str, float] | None = None) -> dict:
    """Build and evaluate one unit; a unit whose target fails to build or run gets a failed row (and leaves no
    half-built artifact), is retried by the next run, and does not stop the others."""
    plan, ctx, task = units.plan, units.ctx, units.task
    state = unit_state(out_dir, ctx.loaded.name, t.name, key)
    art = None
    timings = timings if timings is not None else {"build_s": 0.0, "evaluate_s": 0.0}
    try:
        t0 = time.perf_counter()
        art = build_searched(ctx, t)
        t1 = time.perf_counter()
        _evaluate_unit(units, t, art, state)
        timings["build_s"] += t1 - t0
        timings["evaluate_s"] += time.perf_counter() - t1
        row = unit_row(plan, ctx.loaded.name, t, key, state, art, task)
    except (*TARGET_ERRORS, UnitFailed) as exc:
        if units.make_runner is None:  # an artifact a device cannot run may still be good here
            remove_artifact(art)
        note(f"FAILED {ctx.loaded.name} {t.name}: {exc}")
        return failed_row(ctx.loaded.name, t, key, str(exc))
    check_readable(row, t, state)
    return row
