"""``quantship eval``: build every target, evaluate all on the same images, write the results."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from quantship.config import CalibrationSpec, Gate, PtqSteps, RemoteOptions, TrtOptions
from quantship.data.datasets import Skipped
from quantship.evaluate.diff import diff_images
from quantship.evaluate.explain import instead_clause
from quantship.evaluate.loop import Batches
from quantship.evaluate.report import VERDICT_COLUMNS, load_results
from quantship.evaluate.results import text_table, write_results
from quantship.evaluate.tasks import make_task
from quantship.evaluate.verdicts import FAIL, PASS, judge_target, overall_verdict
from quantship.fileio import FolderLock, sha256_json, write_text_atomic
from quantship.jobs import JobResult
from quantship.jobs.remote_engine import RemoteEngineBuilder
from quantship.models.loading import resolve_preprocess
from quantship.remote.host import DeviceSession, RemoteRunner
from quantship.runtime.base import RunnerOptions
from quantship.targets import get_target, needs_calibration, parse_targets
from quantship.targets.run import (
    Evaluated,
    RunSettings,
    build_targets,
    check_model_source,
    check_providers_for,
    check_readable,
    evaluate_targets,
    evaluated_rows,
    failure_lines,
    load_evaluation_data,
    load_for,
    nonfinite_error,
    prepare_run,
    run_data,
)
from quantship.targets.why import WHY_IMAGES, attach_why, gate_outcomes, why_lines


@dataclass
class EvalSpec:
    """Everything ``quantship eval`` needs; also the record of how a result was produced."""

    model: str
    data: str
    targets: list[str]
    out_dir: Path
    weights: str | None = None
    labels: str | None = None
    limit: int | None = None
    batch_size: int = 8
    threads: int | None = None
    workers: int = 4
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    preprocess_overrides: dict[str, Any] = field(default_factory=dict)
    trt: TrtOptions = field(default_factory=TrtOptions)
    anchors: str | None = None  # anchor configuration of a detection model given as a file
    providers: tuple[str, ...] = ("cpu",)  # ONNX Runtime execution providers
    allow_nonfinite: bool = False  # NaN/inf outputs are counted in the rows but do not fail the run
    allow_missing_images: bool = False  # ground truth listing absent files: evaluate those present
    trust_savedmodel: bool = False  # a SavedModel runs its graph's operations: only when the user says so
    ptq: PtqSteps = field(default_factory=PtqSteps)  # post-training steps of the quantized targets
    remote: RemoteOptions | None = None  # run the artifacts on this device (the reference stays here)
    gates: tuple[Gate, ...] = ()  # judged on every target against the reference (``--gate``); why-lines on failures


def run_eval(spec: EvalSpec) -> JobResult:
    """Evaluate ``spec.targets`` side by side.

    Returns:
        The result rows (also written to ``out_dir/results.jsonl`` and ``results.md``) and a summary; exit code
        1 when a target failed to build or run (its row says why; the others are evaluated).
    """
    # Names are checked before any work: unknown targets, models or options fail at once.
    targets = parse_targets(spec.targets)
    check_providers_for(targets, spec.providers)
    preprocess = resolve_preprocess(spec.model, spec.weights, spec.preprocess_overrides)
    out_dir = Path(spec.out_dir)
    session = _remote_session(spec)
    copied: dict[str, bool] = {}
    with session or contextlib.nullcontext(), FolderLock(out_dir, f"quantship eval {spec.model}"):
        dataset = load_evaluation_data(spec.data, spec.labels, spec.allow_missing_images)
        check_model_source(spec.model, spec.weights, spec.trust_savedmodel)
        split = run_data(dataset, spec.calibration, spec.limit, bool(needs_calibration(targets, spec.trt, spec.ptq)))
        loaded = load_for(spec.model, spec.weights, preprocess, dataset, trust_savedmodel=spec.trust_savedmodel)
        task = make_task(dataset, loaded, spec.anchors)
        options = RunnerOptions(threads=spec.threads, providers=spec.providers)
        settings = RunSettings(spec.calibration, spec.limit, options, spec.workers, spec.trt, spec.ptq)
        ctx, calib, evalset = prepare_run(loaded, targets, dataset, out_dir, settings, split)
        if session is not None:  # TensorRT engines are built on the device they run on
            ctx.engine_builder = RemoteEngineBuilder(session)
        skipped: list[Skipped] = []
        try:
            artifacts, failures = build_targets(ctx, targets)
            built = [t for t in targets if t.name not in failures]
            make = remote_runners(session, copied) if session else None
            batches = Batches(evalset, spec.batch_size, spec.workers, skipped)
            runs = evaluate_targets(ctx, built, artifacts, batches, task, make)
        finally:
            ctx.close()
        if skipped:
            write_text_atomic(out_dir / "skipped.txt", "".join(f"{s.key}\t{s.reason}\n" for s in skipped))
        check_readable(len(evalset) - len(skipped), skipped)
        calib_info = ctx.calibration.info if ctx.calibration else {}
        used = ctx.calibration.images_used() if ctx.calibration else None
        extra = {
            # The images calibration read (an unreadable one is left out), not the ones drawn.
            "calibration_images": len(calib) if used is None else used,
            "calibration_source": calib_info.get("source"),
            "calibration_list_sha256": calib_info.get("list_sha256"),
            "eval_spec_hash": sha256_json(dataclasses.asdict(spec))[:16],
        }
        rows = evaluated_rows(task, targets, Evaluated(runs, artifacts, failures, skipped), ctx, evalset, extra)
        if session is not None:
            _mark_remote(rows, session, copied)
        verdicts = gate_rows(spec.gates, task, rows, runs)
        images = lambda: diff_images(evalset, loaded.preprocess, 4, spec.workers, limit=WHY_IMAGES)  # noqa: E731
        explain_verdicts(verdicts, rows, loaded, artifacts, images, spec.threads)
        write_verdicts(out_dir, verdicts)
        origin = f" from {calib_info['source']}" if calib_info.get("source") else ""
        listed = f" listed in {calib_info['list']}" if calib_info.get("list") else ""
        unread = len(calib) - used if used is not None else 0
        notes = [
            f"{len(evalset)} evaluation images from {dataset.source}; {len(calib)} disjoint calibration images"
            f"{listed}{origin}" + (f" ({unread} unreadable, left out)" if unread else "")
        ]
        if skipped:
            notes.append(f"{len(skipped)} unreadable image(s) skipped, listed in skipped.txt")
        notes += failure_lines(rows)
        notes += [f"why {v['target']} failed {v['gate']}: {v['why']}" for v in verdicts if v.get("why")]
        write_results(out_dir, rows, f"quantship eval: {loaded.name} on {dataset.source}", notes, task.columns)
    lines = ["", text_table(rows, task.columns), ""]
    lines.append(
        f"{len(evalset)} images, {len(calib)} calibration images"
        + (f" ({unread} unreadable, left out)" if unread else "")
        + (f", {len(skipped)} unreadable skipped (skipped.txt)" if skipped else "")
    )
    if dataset.meta.get("missing_images"):
        lines.append(
            f"{dataset.meta['missing_images']} image(s) listed in the ground truth are missing (not evaluated)"
        )
    failed = failure_lines(rows)
    lines += failed
    if session is not None:
        env = session.environment
        lines.append(f"artifacts ran on {session.url} ({env.get('cpu')}, {env.get('machine')}); the reference ran here")
    gate_text, gates_failed = verdict_lines(out_dir, verdicts)
    lines += gate_text
    lines.append(f"results: {out_dir / 'results.jsonl'}, {out_dir / 'results.md'}")
    nonfinite = nonfinite_error(rows, spec.allow_nonfinite)
    if nonfinite:
        lines.append(nonfinite)
    return JobResult(rows, lines, 1 if failed or nonfinite or gates_failed else 0)


def write_verdicts(out_dir: Path, verdicts: list[dict[str, Any]]) -> None:
    """``verdicts.jsonl`` as sign-off writes it (the report reads it); removed when no gate was given, so an
    older run's verdicts never pass for this run's."""
    if verdicts:
        write_text_atomic(out_dir / "verdicts.jsonl", "".join(json.dumps(v, sort_keys=True) + "\n" for v in verdicts))
    else:
        (out_dir / "verdicts.jsonl").unlink(missing_ok=True)


def verdict_lines(out_dir: Path, verdicts: list[dict[str, Any]]) -> tuple[list[str], bool]:
    """The console's gate table, headline and why-lines; and whether the gates fail the run."""
    if not verdicts:
        return [], False
    shown = load_results(out_dir)["verdicts"]  # with the report's display fields (interval, verdict text)
    overall = overall_verdict(verdicts)
    lines = ["", text_table(shown, VERDICT_COLUMNS), overall.headline]
    why = [f"  why {v['target']} failed {v['gate']}: {v['why']}" for v in verdicts if v.get("why")]
    if why:
        lines += [f"why (the reference and each failing target compared layer by layer on {WHY_IMAGES} images):", *why]
    return lines, overall.exit_code() != 0


def gate_rows(gates: Sequence[Gate], task: Any, rows: list[dict[str, Any]], runs: dict[str, Any]) -> list[dict]:
    """Every gate on every evaluated target against the rows' reference: verdict rows as sign-off writes them
    (``verdicts.jsonl``); each target's row gains ``gate_verdict`` (FAIL if any of its gates failed)."""
    out: list[dict[str, Any]] = []
    ref = next((r["reference"] for r in rows if r.get("reference")), None)
    by_target = {r["target"]: r for r in rows}
    for row in rows:
        name = row["target"]
        if name == ref:
            continue
        out += judge_target(
            gates,
            task,
            row["model"],
            name,
            ref,
            (row, by_target.get(ref)),
            lambda name=name: (runs[name].arrays, runs[ref].arrays),
        )
        mine = [v["verdict"] for v in out if v["target"] == name]
        if mine:
            row["gate_verdict"] = FAIL if FAIL in mine else PASS if all(v == PASS for v in mine) else mine[0]
    return out


def explain_verdicts(
    verdicts: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    loaded: Any,
    artifacts: dict[str, Any],
    images: Callable[[], Any],
    threads: int | None,
) -> None:
    """A ``why`` line on each FAIL verdict of a target that ran (and on its row): where it parts from the
    reference on the first :data:`~quantship.targets.why.WHY_IMAGES` images, and the targets that passed every
    gate in this run. Computed after the verdicts, never changing them."""
    failing, passing = gate_outcomes(verdicts)
    if not failing:
        return
    ref = get_target(verdicts[0]["reference"])
    lines = why_lines(
        loaded, ref, [get_target(n) for n in failing], artifacts, images, instead_clause(passing), threads
    )
    attach_why(verdicts, lines)
    for r in rows:
        if r["target"] in lines:
            r["why"] = lines[r["target"]]


def _remote_session(spec: EvalSpec) -> Any:
    """The (unopened) device session of ``eval --remote``, or None; a malformed URL is refused here."""
    if spec.remote is None:
        return None

    return DeviceSession(spec.remote)


def remote_runners(session: Any, copied: dict[str, bool]) -> Callable:
    """Runners of ``eval --remote``: each artifact runs on the device, with the options its target runs with
    locally; the in-memory reference (keras-fp32) runs here."""

    def make(target: Any, ctx: Any, artifact: Any) -> Any:
        if artifact is None:
            return target.make_runner(ctx, artifact)
        runner = RemoteRunner(session, artifact.path, target.spec.backend, target.runner_options(ctx), target.name)
        copied[target.name] = session.put(artifact.path)[1]
        return runner

    return make


def _mark_remote(rows: list[dict[str, Any]], session: Any, copied: dict[str, bool]) -> None:
    """``where`` and the ``remote`` object of the rows that ran on the device."""
    fields = session.fields()
    for row in rows:
        if row.get("target") in copied:
            row["where"] = "remote"
            row["remote"] = {**fields, "artifact_copied": copied[row["target"]]}
