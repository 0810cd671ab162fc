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


def _detect_chunk(runner: Any, sub: ImageDataset, ctx: Any, plan: SignoffPlan, anchors_cfg: Any, timed_first: bool) -> dict[str, np.ndarray]:
    """Run one chunk of a detection dataset; detections are stored flat with their image's index."""
    from quantship.models.ssd import make_anchors, postprocess

    anchors = make_anchors(anchors_cfg)
    keys, owner, boxes, scores, classes = [], [], [], [], []
    seconds, timed = 0.0, 0
    skipped: list[Skipped] = []
    for i, batch in enumerate(iter_batches(sub, ctx.loaded.preprocess, plan.batch_size, plan.workers, skipped)):
        out = next(iter(runner.infer(batch.inputs[:, 0]).values()))
        if timed_first or i > 0:
            seconds += runner.last_inference_time or 0.0
            timed += len(out)
        for o, key, label in zip(out, batch.keys, batch.labels):
            det = postprocess(o, anchors, anchors_cfg, (label["width"], label["height"]))
            owner += [len(keys)] * len(det.scores)
            keys.append(key)
            boxes.append(det.boxes)
            scores.append(det.scores)
            classes.append(det.classes)
    return {
        "keys": np.asarray(keys, dtype=str),
        "det_image": np.asarray(owner, np.int64),
        "det_boxes": np.concatenate(boxes).reshape(-1, 4) if boxes else np.zeros((0, 4), np.float32),
        "det_scores": np.concatenate(scores) if scores else np.zeros(0, np.float32),
        "det_classes": np.concatenate(classes) if classes else np.zeros(0, np.int64),
        "seconds": np.asarray([seconds]),
        "timed_images": np.asarray([timed]),
        "skipped": np.asarray([s.key for s in skipped], dtype=str),
    }


def _evaluate_unit(plan: SignoffPlan, ctx: Any, target: Any, evalset: ImageDataset, state: Path, anchors_cfg: Any = None) -> None:
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
            if evalset.task == "detection":
                _save_chunk(_chunk_path(state, start), _detect_chunk(runner, sub, ctx, plan, anchors_cfg, timed_first=k > 0))
                continue
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


def _detections_by_image(d: dict[str, np.ndarray]) -> list[Any]:
    """Stored flat detections back to one Detections per image (owners are stored in image order)."""
    from quantship.evaluate.detection_metrics import Detections

    cuts = np.searchsorted(d["det_image"], np.arange(1, len(d["keys"])))
    return [Detections(b, s, c) for b, s, c in zip(np.split(d["det_boxes"], cuts), np.split(d["det_scores"], cuts), np.split(d["det_classes"], cuts))]


def _load_detection_chunks(state: Path) -> dict[str, np.ndarray]:
    """Chunks concatenated, with each detection's image index made global."""
    parts = [dict(np.load(p, allow_pickle=False)) for p in sorted(state.glob("chunk-*.npz"))]
    base = 0
    for p in parts:
        p["det_image"] = p["det_image"] + base
        base += len(p["keys"])
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def stored_detections(dataset: ImageDataset, d: dict[str, np.ndarray]) -> tuple[list[Any], list[dict[str, Any]]]:
    """(detections, ground truth) per stored image, paired by image key."""
    labels = {s.key: s.label for s in dataset.samples}
    return _detections_by_image(d), [labels[str(k)] for k in d["keys"]]


def detection_metric(meta: dict[str, Any], dets: list[Any], labels: list[dict[str, Any]], images: np.ndarray | None = None) -> dict[str, Any]:
    """mAP (and COCO's figures) of per-image detections, over all images or the given image indices."""
    from quantship.evaluate.detection_metrics import metric_for

    idx = range(len(dets)) if images is None else images
    metric = metric_for(meta)
    metric.update([dets[i] for i in idx], [labels[i] for i in idx])
    return metric.result()


def _unit_row(plan: SignoffPlan, model: str, target: Any, key: str, state: Path, artifact_path: str | None, dataset: ImageDataset | None = None) -> dict[str, Any]:
    if dataset is not None and dataset.task == "detection":
        d = _load_detection_chunks(state)
        m = detection_metric(dataset.meta, *stored_detections(dataset, d))
        timed = int(d["timed_images"].sum())
        return {
            "model": model, "target": target.name, "runtime": target.spec.backend.value, "precision": target.spec.precision.value,
            "dataset": plan.data, "task": "detection", "images": int(len(d["keys"])), "skipped": int(d["skipped"].size),
            **{k: v for k, v in m.items() if not isinstance(v, dict)}, "per_class_ap": m.get("per_class_ap"),
            "latency_ms": 1e3 * float(d["seconds"].sum()) / timed if timed else None,
            "unit_key": key, "state": str(state), "artifact": artifact_path, "manifest": f"{artifact_path}.json" if artifact_path else None,
        }
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


def _detection_verdicts(plan: SignoffPlan, model: str, targets: dict[str, dict], dataset: ImageDataset) -> list[dict[str, Any]]:
    """mAP gates: paired bootstrap over images, mAP recomputed on each resample (at most 200 resamples:
    every one is a full AP computation)."""
    ref = targets[plan.reference]
    ref_d = _load_detection_chunks(Path(ref["state"]))
    n = len(ref_d["keys"])
    rng = np.random.default_rng(0)
    samples = min(plan.bootstrap_samples, 200)
    resamples = [rng.integers(0, n, n) for _ in range(samples)]
    ref_dets, labels = stored_detections(dataset, ref_d)
    ref_boot = np.array([detection_metric(dataset.meta, ref_dets, labels, idx)["mAP"] for idx in resamples])
    rv = ref["mAP"]
    alpha = (1 - plan.confidence) / 2
    out = []
    for name, row in targets.items():
        if name == plan.reference:
            continue
        d = _load_detection_chunks(Path(row["state"]))
        if list(d["keys"]) != list(ref_d["keys"]):
            raise DataError(f"{name}: evaluated images differ from the reference's; cannot pair them")
        dets = _detections_by_image(d)  # same images as the reference (checked above): same labels
        boot = np.array([detection_metric(dataset.meta, dets, labels, idx)["mAP"] for idx in resamples])
        tv = row["mAP"]
        for gate in plan.gates:
            if not gate.applies(name):
                continue
            if gate.metric != "mAP":
                raise DataError(f"gate metric '{gate.metric}' is not measured for detection (mAP)")
            if gate.relative is not None:
                value, stat, passed = tv / rv if rv > 0 else float("nan"), boot / np.where(ref_boot > 0, ref_boot, np.nan), bool(rv > 0 and tv >= gate.relative * rv)
            else:
                value, stat = 100.0 * (tv - rv), 100.0 * (boot - ref_boot)
                passed = bool(-value <= gate.max_drop_points)
            lo, hi = float(np.nanquantile(stat, alpha)), float(np.nanquantile(stat, 1 - alpha))
            out.append({"model": model, "target": name, "reference": plan.reference, "metric": "mAP", "gate": gate.describe(),
                        "kind": "relative" if gate.relative is not None else "drop_points", "reference_value": rv, "target_value": tv,
                        "delta_points": 100.0 * (tv - rv), "value": value, "ci_low": lo, "ci_high": hi, "confidence": plan.confidence,
                        "images": n, "passed": passed})
    return out


def verdicts(plan: SignoffPlan, rows: list[dict[str, Any]], dataset: ImageDataset | None = None) -> list[dict[str, Any]]:
    """Gate every (model, target) row against its model's reference row, with bootstrap intervals."""
    out = []
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["target"]] = r
    for model, targets in by_model.items():
        ref = targets.get(plan.reference)
        if ref is None:
            continue
        if ref.get("task") == "detection":
            out += _detection_verdicts(plan, model, targets, dataset or load_dataset(plan.data, labels=plan.labels))
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
    from quantship.pipeline import detection_anchors, prepare_run, resolve_preprocess
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
        detection = dataset.task == "detection"
        n_classes = len(dataset.meta["classes"]) + 1 if detection and not Path(entry.name).exists() else None
        loaded = load_model(entry.name, entry.weights, resolve_preprocess(entry.name, entry.preprocess), num_classes=n_classes)
        anchors_cfg = detection_anchors(loaded, dataset, plan.options.get("anchors")) if detection else None
        ctx, _, evalset = prepare_run(loaded, targets, dataset, plan.calibration, plan.limit, out_dir, plan.threads, plan.workers, plan.options)
        try:
            for t in targets:
                key = keys[t.name]
                if key in stored:
                    continue
                state = out_dir / "state" / f"{loaded.name}-{t.name}-{key}"
                _evaluate_unit(plan, ctx, t, evalset, state, anchors_cfg)
                art = t.build(ctx, t.spec) if t.spec.backend.value != "keras" else None
                row = _unit_row(plan, loaded.name, t, key, state, str(art.path) if art else None, dataset)
                append_jsonl(rows_path, row)
                stored[key] = row
        finally:
            ctx.close()
    rows = list(stored.values())
    verdict_rows = verdicts(plan, rows, dataset)
    from quantship.fileio import write_text_atomic
    import json

    write_text_atomic(out_dir / "verdicts.jsonl", "".join(json.dumps(v, sort_keys=True) + "\n" for v in verdict_rows))
    return rows, verdict_rows
