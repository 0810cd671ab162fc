"""``quantship signoff PLAN.yaml``: run a models x targets matrix, gate it, and keep every result on disk.

Resumable by construction. Each (model, target) unit is evaluated in chunks of images; every finished chunk is
written atomically to ``state/`` before the next starts, and a finished unit appends its row to
``signoff.jsonl`` (fsync'd). A run started again skips every stored chunk and row, so a kill at any moment
loses at most the chunk in flight and recomputes nothing that was stored. A unit's key holds everything its
numbers depend on (the content of every input file, the dataset listing, preprocessing, chunking, batch size,
calibration settings, runtime options and the versions of the tools that compute them), so a stored result is
only ever reused for exactly the same inputs. Verdicts and reports cover exactly the current plan; results of
other keys stay on disk and are listed as not in this plan. One run at a time holds the output folder.

This module picks the executor (:mod:`~quantship.signoff.units` has the local one and everything a unit is,
:mod:`~quantship.signoff.ray_executor` the Ray one) and drives the run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from quantship.errors import QuantshipError
from quantship.evaluate.bench import latency_pass
from quantship.evaluate.environment import environment
from quantship.evaluate.stability import StopRule
from quantship.evaluate.tasks import make_task
from quantship.fileio import FolderLock, append_jsonl, read_jsonl, write_json_atomic, write_text_atomic
from quantship.models.loading import resolve_preprocess
from quantship.progress import note
from quantship.signoff.cluster import clean_stale_instance
from quantship.signoff.plan import ExecutorKind, SignoffPlan
from quantship.signoff.ray_executor import RayExecutor
from quantship.signoff.units import (
    AGREEMENT_FIELDS,
    Executor,
    LocalExecutor,
    ModelWork,
    SignoffJob,
    plan_data,
    stored_intact,
    unit_inputs,
    unit_key,
    verdicts,
    with_agreement,
)
from quantship.targets import get_target, parse_targets
from quantship.targets.run import check_providers_for


def make_executor(plan: SignoffPlan, ray_address: str | None = None, local_cpus: int | None = None) -> Executor:
    """The executor a run uses: Ray when the plan says ``executor: ray`` or an address is given (then that
    cluster, else a loopback-only local instance with ``local_cpus`` CPUs), local otherwise. ``RAY_ADDRESS`` is
    never read: it neither switches to Ray nor sends a run to a cluster."""
    if ray_address is None and plan.executor is not ExecutorKind.RAY:
        return LocalExecutor()
    return RayExecutor(address=ray_address, local_cpus=local_cpus)


def bench_pass(
    plan: SignoffPlan, rows: list[dict[str, Any]], out_dir: Path, make_worker: Any = None
) -> list[dict[str, Any]]:
    """The report's latency: the plan's artifact files of each model timed interleaved (batch 1, the plan's
    threads, ratios to the first fp32 target of the same runtime with their intervals), written to
    ``bench.jsonl`` (measured again by every run: a latency is not a stored result). In-memory targets (Keras)
    and files this machine cannot see keep the evaluation's ms per image. Off with ``bench: false``.
    ``make_worker`` times each file elsewhere (a plan's ``remote:`` device: the executor's ``make_bench_worker``)."""

    path = out_dir / "bench.jsonl"
    if not plan.bench.enabled:
        path.unlink(missing_ok=True)  # an older run's figures would pass for this plan's
        return []
    out: list[dict[str, Any]] = []
    b = plan.bench
    for model in dict.fromkeys(r["model"] for r in rows):
        files = [
            (r["target"], r["artifact"], tuple(get_target(r["target"]).session_config))
            for r in rows
            if r["model"] == model and r.get("status") == "ok" and r.get("artifact") and Path(r["artifact"]).is_file()
        ]
        if not files:
            continue
        note(f"bench pass: {model}, {len(files)} artifact(s) interleaved (batch 1)")
        lines: list[str] = []
        try:
            timed = latency_pass(
                files,
                plan.threads,
                StopRule(b.ratio_precision, b.min_rounds, b.max_seconds),
                lines=lines,
                queries_per_round=b.queries_per_round,
                reference=b.reference,
                make_worker=make_worker,
            )
        except QuantshipError as exc:  # the evaluation stands; its latency is shown instead
            note(f"bench pass of {model} failed ({exc}): the report shows the evaluation's ms per image")
            continue
        for line in lines:
            note(line)
        out += [{**row, "model": model} for row in timed.values()]
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in out))
    return out


def signoff(
    plan: SignoffPlan, out_dir: Path, ray_address: str | None = None, executor: Executor | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run (or resume) the plan; returns (rows of the plan, verdicts). Rows, verdicts, the plan and the
    environment are written under ``out_dir``.

    Args:
        ray_address: Run on the Ray cluster at this address (see :func:`make_executor`).
        executor: Run with this executor (default: the plan's).
    """
    out_dir = Path(out_dir)
    targets = parse_targets([plan.reference, *plan.targets], "plan targets")
    executor = executor or make_executor(plan, ray_address)
    if isinstance(executor, LocalExecutor):  # Ray workers may have providers this machine lacks: they check there
        check_providers_for(targets, plan.ort_providers, "ort_providers")
    preprocesses = {m.name: resolve_preprocess(m.name, m.weights, m.preprocess) for m in plan.models}
    with FolderLock(out_dir, f"quantship signoff {plan.name}"):
        clean_stale_instance(out_dir)
        rows_path = out_dir / "signoff.jsonl"
        stored = {r["unit_key"]: r for r in read_jsonl(rows_path) if "unit_key" in r}
        dataset, split = plan_data(plan, targets)
        calib, evalset = split.calib, split.evalset
        current: list[str] = []
        work: list[ModelWork] = []
        for entry in plan.models:
            inputs = unit_inputs(plan, entry, preprocesses[entry.name], evalset, calib)
            keys = {t.name: unit_key(plan, entry, t.name, inputs) for t in targets}
            current += keys.values()
            todo = [t for t in targets if not stored_intact(stored.get(keys[t.name]), plan, evalset)]
            if todo:
                work.append(ModelWork(entry, preprocesses[entry.name], keys, todo))
        for row in executor.run(SignoffJob(plan, targets, dataset, split, out_dir), work):
            stored[row["unit_key"]] = row
            append_jsonl(rows_path, row)
        # One row per key (a unit that failed and then ran keeps only its last row), rewritten atomically.
        write_text_atomic(rows_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in stored.values()))
        task = make_task(dataset)
        rows = with_agreement(plan, [stored[k] for k in current], task)
        # Agreement depends on two units, so it is not part of either's stored row: a file of its own, rewritten
        # from the chunks by every run (the report joins it to the rows by unit key).
        write_text_atomic(
            out_dir / "agreement.jsonl",
            "".join(
                json.dumps({"unit_key": r["unit_key"], **{k: r[k] for k in AGREEMENT_FIELDS if k in r}}) + "\n"
                for r in rows
                if "agreement_top1" in r
            ),
        )
        verdict_rows = verdicts(plan, rows, task)
        write_text_atomic(
            out_dir / "verdicts.jsonl", "".join(json.dumps(v, sort_keys=True) + "\n" for v in verdict_rows)
        )
        bench_pass(plan, rows, out_dir, getattr(executor, "make_bench_worker", None))
        write_json_atomic(out_dir / "plan.json", {**dataclasses.asdict(plan), "unit_keys": current})
        write_json_atomic(
            out_dir / "environment.json",
            {**environment(), "ort_providers": list(plan.ort_providers), "executor": executor.record()},
        )
    return rows, verdict_rows
