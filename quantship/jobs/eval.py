"""``quantship eval``: build every target, evaluate all on the same images, write the results."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from quantship.data.datasets import Skipped, load_dataset
from quantship.evaluate.results import text_table, write_results
from quantship.evaluate.tasks import make_task
from quantship.fileio import sha256_json, write_text_atomic
from quantship.jobs import JobResult
from quantship.jobs.common import EvaluatedTarget, build_targets, evaluate_targets, load_for, prepare_run, result_rows
from quantship.jobs.specs import EvalSpec
from quantship.models.loading import resolve_preprocess
from quantship.runtime.base import RunnerOptions
from quantship.targets import parse_targets


def run_eval(spec: EvalSpec) -> JobResult:
    """Evaluate ``spec.targets`` side by side.

    Returns:
        The result rows (also written to ``out_dir/results.jsonl`` and ``results.md``) and a summary.
    """
    # Names are checked before any work: unknown targets, models or options fail at once.
    targets = parse_targets(spec.targets)
    preprocess = resolve_preprocess(spec.model, spec.weights, spec.preprocess_overrides)
    dataset = load_dataset(spec.data, labels=spec.labels)
    loaded = load_for(spec.model, spec.weights, preprocess, dataset)
    task = make_task(dataset, loaded, spec.anchors)
    out_dir = Path(spec.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = RunnerOptions(threads=spec.threads)
    ctx, calib, evalset = prepare_run(
        loaded, targets, dataset, spec.calibration, spec.limit, out_dir, options, spec.workers, spec.trt, spec.ptq
    )
    skipped: list[Skipped] = []
    try:
        artifacts = build_targets(ctx, targets)
        runs = evaluate_targets(ctx, targets, artifacts, evalset, task, spec.batch_size, spec.workers, skipped)
    finally:
        ctx.close()
    if skipped:
        write_text_atomic(out_dir / "skipped.txt", "".join(f"{s.key}\t{s.reason}\n" for s in skipped))
    evaluated = [EvaluatedTarget(t, runs[t.name].arrays, runs[t.name].latency_ms, artifacts[t.name]) for t in targets]
    extra = {"calibration_images": len(calib), "eval_spec_hash": sha256_json(dataclasses.asdict(spec))[:16]}
    rows = result_rows(task, evaluated, loaded, evalset, skipped, extra)
    notes = [f"{len(evalset)} evaluation images from {dataset.source}; {len(calib)} disjoint calibration images"]
    if skipped:
        notes.append(f"{len(skipped)} unreadable image(s) skipped, listed in skipped.txt")
    write_results(out_dir, rows, f"quantship eval: {loaded.name} on {dataset.source}", notes, task.columns)
    lines = ["", text_table(rows, task.columns), ""]
    lines.append(
        f"{rows[0]['images']} images, {len(calib)} calibration images"
        + (f", {len(skipped)} unreadable skipped (skipped.txt)" if skipped else "")
    )
    lines.append(f"results: {out_dir / 'results.jsonl'}, {out_dir / 'results.md'}")
    return JobResult(rows, lines)
