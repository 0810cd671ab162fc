"""``quantship sensitivity`` (and ``convert --auto-fallback``): prepare, run the analyses of
:mod:`quantship.sensitivity`, write the rows and the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantship.config import Gate
from quantship.data.datasets import dataset_task, labelled_kind
from quantship.evaluate.report import build_report
from quantship.evaluate.results import text_table
from quantship.evaluate.tasks import check_gate
from quantship.fileio import FolderLock, write_text_atomic
from quantship.jobs import JobResult
from quantship.progress import note
from quantship.sensitivity import Analyses, SensitivitySpec, prepare, run_analyses

__all__ = ["Analyses", "SensitivitySpec", "checked_gate", "run_sensitivity"]


def checked_gate(text: str, data: str) -> Any:
    """``--gate`` parsed and checked against the metrics of ``--data``'s task before any work: a metric the data
    cannot give (top1 on ``images:``), one of another task, a rule against the metric's direction or a threshold
    outside its range is one line, exit 2."""

    return check_gate(Gate.parse(text), dataset_task(data), labelled_kind(data), f"--gate {text}")


SENSITIVITY_SHOWN = (
    ("backend", "backend", "{}"),
    ("rank", "rank", "{}"),
    ("layer", "layer", "{}"),
    ("metric", "metric", "{}"),
    ("value", "value", "{:.4f}"),
    ("delta", "Δ", "{:+.4f}"),
    ("agreement_top1", "agree", "{:.4f}"),
    ("mean_l1", "mean L1", "{:.4f}"),
    ("sqnr_db", "SQNR dB", "{:.1f}"),
    ("images", "images", "{}"),  # fewer than the rest: a layer screened as harmless on half the images
)


WEIGHTS_SHOWN = (
    ("precision", "weights", "{}"),
    ("post_training", "post-training", "{}"),
    ("metric", "metric", "{}"),
    ("value", "value", "{:.4f}"),
    ("delta", "Δ", "{:+.4f}"),
    ("agreement_top1", "agree", "{:.4f}"),
    ("sqnr_db", "SQNR dB", "{:.1f}"),
)


def run_sensitivity(
    spec: SensitivitySpec,
    analyses: Analyses,
    out: Any,
    threads: int | None = None,
    show: int = 10,
    jsonl_name: str = "sensitivity.jsonl",
    report: bool = True,
) -> Any:
    """``quantship sensitivity`` (and ``convert --auto-fallback``, which asks for the gate alone): prepare, run the
    analyses, write the rows (and the report); the exit code is 1 when a gate is asked for and some backend
    still fails it."""

    out = Path(out)
    lines: list[str] = []
    with FolderLock(out, f"quantship sensitivity {spec.model}"):
        setup = prepare(spec, out, threads)
        try:
            rows, result = run_analyses(setup, analyses, threads=threads, print_fn=note)
        finally:
            setup.close()
    write_text_atomic(out / jsonl_name, "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows))
    single = [r for r in rows if r["kind"] == "single"]
    if single:
        # The --show most harmful layers of every backend (rows come ranked per backend).
        shown = [r for b in analyses.backends for r in [x for x in single if x["backend"] == b][:show]]
        lines.append(text_table(shown, SENSITIVITY_SHOWN))
    weights = [r for r in rows if r["kind"] == "weights" and r["layers"] in ("all", "mixed")]
    if weights:
        lines.append("weight study (all layers at once; post-training steps as asked):")
        lines.append(text_table(weights, WEIGHTS_SHOWN))
    for r in rows:
        if r["kind"] == "fallback_cost":
            lines.append(
                f"{r['backend']:7s} {r['variant']:14s} {r['artifact']}: {r['metric']} {r['value']:.4f}, "
                # Agreement with fp32 too: on photo folders labelled 0 the metric itself says nothing.
                + (f"agreement {r['agreement_top1']:.4f}, " if r.get("agreement_top1") is not None else "")
                + f"{r['size_mb']:.2f} MB, p50 {r['latency_ms_p50']:.2f} ms"
            )
    if report:
        md, page = build_report(out, f"sensitivity: {setup.loaded.name}")
        lines.append(f"results: {out / jsonl_name}; report: {page}, {md}")
    else:
        lines.append(f"results: {out / jsonl_name}")
    return JobResult(rows, lines, 1 if (result is not None and not result.passed) else 0)
