"""``quantship signoff PLAN.yaml``: run a models x targets matrix, gate it, and keep every result on disk.

Resumable by construction. Each (model, target) is evaluated in chunks of images; every finished chunk is
written atomically to ``state/`` before the next starts, and a finished (model, target) appends its row to
``signoff.jsonl`` (fsync'd). A run started again skips every stored chunk and row, so a kill at any moment
loses at most the chunk in flight and recomputes nothing that was stored. Artifacts are reused through their
manifests' build keys. Verdicts are derived from the stored chunks, never from memory.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from quantship.config import SignoffPlan
from quantship.errors import DataError
from quantship.evaluate.datasets import ImageDataset, Skipped, iter_batches, load_dataset
from quantship.evaluate.stats import bootstrap_diff_ci, bootstrap_ratio_ci
from quantship.fileio import append_jsonl, atomic_path, read_jsonl, sha256_json, write_json_atomic
from quantship.progress import track

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
            "options": plan.options,
        }
    )[:16]


def _chunk_path(state: Path, start: int) -> Path:
    return state / f"chunk-{start:08d}.npz"


def _save_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _load_chunks(state: Path) -> dict[str, np.ndarray]:
    parts = [dict(np.load(p, allow_pickle=False)) for p in sorted(state.glob("chunk-*.npz"))]
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _evaluate_unit(plan: SignoffPlan, ctx: Any, target: Any, evalset: ImageDataset, state: Path) -> None:
    """Evaluate one target chunk by chunk, skipping chunks already on disk."""
    from quantship.pipeline import TargetResult, classify_batch

    starts = list(range(0, len(evalset), plan.chunk_images))
    todo = [s for s in starts if not _chunk_path(state, s).is_file()]
    if not todo:
        return
    artifact = target.build(ctx, target.spec)
    runner = target.make_runner(ctx, target.spec, artifact)
    state.mkdir(parents=True, exist_ok=True)
    with runner:
        for k, start in enumerate(track(todo, total=len(todo), desc=f"{ctx.loaded.name} {target.name}")):
            sub = evalset.subset(range(start, min(start + plan.chunk_images, len(evalset))))
            result = TargetResult(target, artifact, runner)
            skipped: list[Skipped] = []
            for i, batch in enumerate(iter_batches(sub, ctx.loaded.preprocess, plan.batch_size, plan.workers, skipped)):
                classify_batch([result], batch, timed=k > 0 or i > 0)
            m = result.metric
            _save_chunk(
                _chunk_path(state, start),
                {
                    "keys": np.asarray(result.keys, dtype=str),
                    "pred": np.asarray(m.top1, dtype=np.int64),
                    "correct1": np.asarray(m.correct[1], dtype=bool),
                    "correct5": np.asarray(m.correct[5], dtype=bool),
                    "seconds": np.asarray([result.seconds]),
                    "timed_images": np.asarray([result.timed_images]),
                    "skipped": np.asarray([s.key for s in skipped], dtype=str),
                },
            )


def _unit_row(plan: SignoffPlan, model: str, target: Any, key: str, state: Path, artifact_path: str | None) -> dict[str, Any]:
    d = _load_chunks(state)
    n = int(d["correct1"].size)
    timed = int(d["timed_images"].sum())
    return {
        "model": model,
        "target": target.name,
        "runtime": target.spec.backend.value,
        "precision": target.spec.precision.value,
        "dataset": plan.data,
        "task": "classification",
        "images": n,
        "skipped": int(d["skipped"].size),
        "top1": float(d["correct1"].mean()) if n else float("nan"),
        "top5": float(d["correct5"].mean()) if n else float("nan"),
        "latency_ms": 1e3 * float(d["seconds"].sum()) / timed if timed else None,
        "unit_key": key,
        "state": str(state),
        "artifact": artifact_path,
        "manifest": f"{artifact_path}.json" if artifact_path else None,
    }


def verdicts(plan: SignoffPlan, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gate every (model, target) row against its model's reference row, with bootstrap intervals."""
    out = []
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["target"]] = r
    for model, targets in by_model.items():
        ref = targets.get(plan.reference)
        if ref is None:
            continue
        ref_d = _load_chunks(Path(ref["state"]))
        for name, row in targets.items():
            if name == plan.reference:
                continue
            d = _load_chunks(Path(row["state"]))
            common, ti, ri = np.intersect1d(d["keys"], ref_d["keys"], return_indices=True)
            for gate in plan.gates:
                if not gate.applies(name):
                    continue
                flag = {"top1": "correct1", "top5": "correct5"}.get(gate.metric)
                if flag is None:
                    raise DataError(f"gate metric '{gate.metric}' is not measured for classification (top1, top5)")
                t = d[flag][ti].astype(np.float64)
                r = ref_d[flag][ri].astype(np.float64)
                tv, rv = float(t.mean()), float(r.mean())
                if gate.relative is not None:
                    value = tv / rv if rv > 0 else float("nan")
                    lo, hi = bootstrap_ratio_ci(t, r, plan.bootstrap_samples, plan.confidence)
                    passed = bool(rv > 0 and value >= gate.relative)
                else:
                    value = 100.0 * (tv - rv)
                    lo, hi = (100.0 * v for v in bootstrap_diff_ci(t, r, plan.bootstrap_samples, plan.confidence))
                    passed = bool(-value <= gate.max_drop_points)
                out.append(
                    {
                        "model": model,
                        "target": name,
                        "reference": plan.reference,
                        "metric": gate.metric,
                        "gate": gate.describe(),
                        "kind": "relative" if gate.relative is not None else "drop_points",
                        "reference_value": rv,
                        "target_value": tv,
                        "delta_points": 100.0 * (tv - rv),
                        "value": value,
                        "ci_low": lo,
                        "ci_high": hi,
                        "confidence": plan.confidence,
                        "images": int(common.size),
                        "passed": passed,
                    }
                )
    return out


def run_signoff(plan: SignoffPlan, out_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run (or resume) the plan; returns (rows, verdicts). Rows, verdicts and the environment are written
    under ``out_dir``."""
    from quantship.evaluate.environment import environment
    from quantship.models.loading import load_model
    from quantship.pipeline import prepare_run, resolve_preprocess
    from quantship.targets import get_target

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [get_target(plan.reference)] + [get_target(t) for t in plan.targets if t != plan.reference]
    rows_path = out_dir / "signoff.jsonl"
    stored = {r["unit_key"]: r for r in read_jsonl(rows_path) if "unit_key" in r}
    write_json_atomic(out_dir / "environment.json", environment())
    write_json_atomic(out_dir / "plan.json", dataclasses.asdict(plan))
    dataset = None
    for entry in plan.models:
        keys = {t.name: unit_key(plan, entry, t.name) for t in targets}
        if all(k in stored for k in keys.values()):
            continue
        dataset = dataset or load_dataset(plan.data, labels=plan.labels)
        loaded = load_model(entry.name, entry.weights, resolve_preprocess(entry.name, entry.preprocess))
        ctx, _, evalset = prepare_run(loaded, targets, dataset, plan.calibration, plan.limit, out_dir, plan.threads, plan.workers, plan.options)
        try:
            for t in targets:
                key = keys[t.name]
                if key in stored:
                    continue
                state = out_dir / "state" / f"{loaded.name}-{t.name}-{key}"
                _evaluate_unit(plan, ctx, t, evalset, state)
                art = t.build(ctx, t.spec) if t.spec.backend.value != "keras" else None
                row = _unit_row(plan, loaded.name, t, key, state, str(art.path) if art else None)
                append_jsonl(rows_path, row)
                stored[key] = row
        finally:
            ctx.close()
    rows = list(stored.values())
    verdict_rows = verdicts(plan, rows)
    from quantship.fileio import write_text_atomic
    import json

    write_text_atomic(out_dir / "verdicts.jsonl", "".join(json.dumps(v, sort_keys=True) + "\n" for v in verdict_rows))
    return rows, verdict_rows
