"""``quantship signoff PLAN.yaml``: run a models x targets matrix, gate it, and keep every result on disk.

Resumable by construction. Each (model, target) is evaluated in chunks of images; every finished chunk is
written atomically to ``state/`` before the next starts, and a finished (model, target) appends its row to
``signoff.jsonl`` (fsync'd). A run started again skips every stored chunk and row, so a kill at any moment
loses at most the chunk in flight and recomputes nothing that was stored. Artifacts are reused through their
manifests' build keys. Verdicts are derived from the stored chunks, never from memory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from quantship.data.datasets import ImageDataset, Skipped, load_dataset
from quantship.evaluate.environment import environment
from quantship.evaluate.loop import run_targets
from quantship.evaluate.report import VERDICT_COLUMNS, build_report, load_results
from quantship.evaluate.results import text_table
from quantship.evaluate.tasks import Task, concat, make_task
from quantship.evaluate.verdicts import gate_verdict
from quantship.fileio import append_jsonl, atomic_path, read_jsonl, sha256_json, write_json_atomic, write_text_atomic
from quantship.jobs import JobResult
from quantship.jobs.common import load_for, prepare_run, target_fields
from quantship.jobs.specs import SignoffPlan
from quantship.manifest import Artifact
from quantship.models.loading import resolve_preprocess
from quantship.progress import track
from quantship.runtime.base import RunnerOptions
from quantship.targets import BuildContext, Target, parse_targets

log = logging.getLogger("quantship")


def unit_key(plan: SignoffPlan, model: Any, target: str) -> str:
    """Identity of one (model, target) evaluation: what it depends on, nothing else."""
    return sha256_json(
        {
            "model": dataclasses.asdict(model),
            "target": target,
            "data": plan.data,
            "labels": plan.labels,
            "limit": plan.limit,
            "calibration": dataclasses.asdict(plan.calibration),
            "anchors": plan.anchors,
            "tensorrt": dataclasses.asdict(plan.tensorrt),
            **({"post_training": plan.post_training.describe()} if plan.post_training.active else {}),
        }
    )[:16]


def _chunk_path(state: Path, start: int) -> Path:
    return state / f"chunk-{start:08d}.npz"


def _save_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def load_chunks(state: Path) -> dict[str, np.ndarray]:
    """Every stored chunk of a unit, joined in image order."""
    return concat([dict(np.load(p, allow_pickle=False)) for p in sorted(Path(state).glob("chunk-*.npz"))])


def _evaluate_unit(
    plan: SignoffPlan,
    ctx: BuildContext,
    target: Target,
    artifact: Artifact | None,
    evalset: ImageDataset,
    task: Task,
    state: Path,
) -> None:
    """Evaluate one target chunk by chunk, skipping chunks already on disk."""
    starts = list(range(0, len(evalset), plan.chunk_images))
    todo = [s for s in starts if not _chunk_path(state, s).is_file()]
    if not todo:
        return
    runner = target.make_runner(ctx, artifact)
    state.mkdir(parents=True, exist_ok=True)
    with runner:
        for k, start in enumerate(track(todo, total=len(todo), desc=f"{ctx.loaded.name} {target.name}")):
            sub = evalset.subset(range(start, min(start + plan.chunk_images, len(evalset))))
            skipped: list[Skipped] = []
            # The first batch of the first chunk this process runs is warm-up, left out of the latency.
            run = run_targets(
                {target.name: runner},
                sub,
                ctx.loaded.preprocess,
                task,
                plan.batch_size,
                plan.workers,
                skipped,
                warmup_batches=0 if k else 1,
                desc=f"chunk {start}",
            )[target.name]
            arrays = run.arrays or task.empty()
            _save_chunk(
                _chunk_path(state, start),
                {
                    **arrays,
                    "seconds": np.asarray([run.seconds]),
                    "timed_images": np.asarray([run.timed_images]),
                    "skipped": np.asarray([s.key for s in skipped], dtype=str),
                },
            )


def _unit_row(
    plan: SignoffPlan, model: str, target: Target, key: str, state: Path, artifact_path: str | None, task: Task
) -> dict[str, Any]:
    d = load_chunks(state)
    timed = int(d["timed_images"].sum())
    return {
        "model": model,
        **target_fields(target),
        "dataset": plan.data,
        "task": task.name,
        "images": task.count(d),
        "skipped": int(d["skipped"].size),
        **task.fields(task.evaluate(d, d["keys"])),
        "latency_ms": 1e3 * float(d["seconds"].sum()) / timed if timed else None,
        "unit_key": key,
        "state": str(state),
        "artifact": artifact_path,
        "manifest": f"{artifact_path}.json" if artifact_path else None,
    }


def verdicts(plan: SignoffPlan, rows: list[dict[str, Any]], task: Task) -> list[dict[str, Any]]:
    """Gate every (model, target) row against its model's reference row, with intervals over the images."""
    out = []
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["target"]] = r
    for model, targets in by_model.items():
        ref = targets.get(plan.reference)
        if ref is None:
            continue
        ref_d = load_chunks(Path(ref["state"]))
        for name, row in targets.items():
            if name == plan.reference:
                continue
            gates = [g for g in plan.gates if g.applies(name)]
            if not gates:
                continue
            d = load_chunks(Path(row["state"]))
            for gate in gates:
                paired = task.paired(gate.metric, d, ref_d, d["keys"])
                out.append(
                    {
                        "model": model,
                        "target": name,
                        "reference": plan.reference,
                        **gate_verdict(gate, paired, plan.bootstrap_samples, plan.confidence),
                    }
                )
    return out


def signoff(plan: SignoffPlan, out_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run (or resume) the plan; returns (rows, verdicts). Rows, verdicts and the environment are written
    under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = parse_targets([plan.reference, *plan.targets], "plan targets")
    rows_path = out_dir / "signoff.jsonl"
    stored = {r["unit_key"]: r for r in read_jsonl(rows_path) if "unit_key" in r}
    write_json_atomic(out_dir / "environment.json", environment())
    write_json_atomic(out_dir / "plan.json", dataclasses.asdict(plan))
    dataset = load_dataset(plan.data, labels=plan.labels)
    for entry in plan.models:
        keys = {t.name: unit_key(plan, entry, t.name) for t in targets}
        if all(k in stored for k in keys.values()):
            continue
        loaded = load_for(
            entry.name, entry.weights, resolve_preprocess(entry.name, entry.weights, entry.preprocess), dataset
        )
        task = make_task(dataset, loaded, plan.anchors)
        ctx, _, evalset = prepare_run(
            loaded,
            targets,
            dataset,
            plan.calibration,
            plan.limit,
            out_dir,
            RunnerOptions(threads=plan.threads),
            plan.workers,
            plan.tensorrt,
            plan.post_training,
        )
        try:
            for t in targets:
                key = keys[t.name]
                if key in stored:
                    continue
                state = out_dir / "state" / f"{loaded.name}-{t.name}-{key}"
                art = t.build(ctx, t.spec)
                _evaluate_unit(plan, ctx, t, art, evalset, task, state)
                row = _unit_row(plan, loaded.name, t, key, state, str(art.path) if art else None, task)
                append_jsonl(rows_path, row)
                stored[key] = row
        finally:
            ctx.close()
    rows = list(stored.values())
    verdict_rows = verdicts(plan, rows, make_task(dataset))
    write_text_atomic(out_dir / "verdicts.jsonl", "".join(json.dumps(v, sort_keys=True) + "\n" for v in verdict_rows))
    return rows, verdict_rows


def run_signoff(plan: SignoffPlan, out_dir: Path) -> JobResult:
    """``quantship signoff``: run or resume, build the report; exit code 1 when a gate fails."""
    lines = [
        f"quantship signoff: {len(plan.models)} model(s) x {len(plan.targets)} target(s) on {plan.data} -> "
        f"{out_dir} (resumable: run again to continue)"
    ]
    rows, verdict_rows = signoff(plan, out_dir)
    md, page = build_report(out_dir, f"sign-off: {plan.name}")
    lines.append(text_table(load_results(out_dir)["verdicts"], VERDICT_COLUMNS))
    failed = [v for v in verdict_rows if not v["passed"]]
    lines.append(
        f"\n{'FAIL' if failed else 'PASS'}: {len(verdict_rows) - len(failed)} of {len(verdict_rows)} gates "
        f"passed. Report: {page}, {md}"
    )
    return JobResult(rows, lines, 1 if failed else 0)
