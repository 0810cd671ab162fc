"""``quantship diff``: where do two runtimes part ways? Every intermediate tensor of each target against the first
target's, on the same images, matched through the Keras layer names the converters keep.

Each backend reads its tensors through the probe its target module registers (:class:`~quantship.targets.keras.
KerasProbe`, :class:`~quantship.targets.tflite.TfliteProbe`, :class:`~quantship.targets.onnx.OnnxProbe`); a target
whose backend registered none is refused before any work.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from quantship.config import CalibrationSpec, CropMode
from quantship.convert.layer_names import KerasLayers
from quantship.data.datasets import iter_batches, load_dataset
from quantship.errors import ConfigError, DataError
from quantship.evaluate.diff import (
    DEFAULT_DROP_DB,
    DIFF_COLUMNS,
    LayerComparison,
    as_float,
    display_rows,
    first_drop,
    layer_rows,
)
from quantship.evaluate.environment import environment
from quantship.evaluate.report import build_report
from quantship.evaluate.results import text_table
from quantship.fileio import FolderLock, write_json_atomic, write_text_atomic
from quantship.jobs import JobResult
from quantship.models.loading import resolve_preprocess
from quantship.progress import note, track
from quantship.runtime.base import RunnerOptions
from quantship.targets import Target, parse_targets
from quantship.targets.base import LayerProbe, ProbeOptions, check_layer_probe, make_layer_probe
from quantship.targets.run import RunSettings, build_targets, check_providers_for, load_for, prepare_run


@dataclass(frozen=True)
class DiffSpec:
    """What ``quantship diff`` compares.

    Attributes:
        targets: The reference first, then the targets compared with it.
        images: Evaluation images compared (disjoint from the calibration images).
        drop_db: A layer whose SQNR is more than this below its input's is marked.
        qdq_ort_defaults: Run the Q/DQ targets at ONNX Runtime's default session options (its fused int8 kernels,
            as before issue 12) instead of as fake-quant: shows where those kernels go wrong on a CPU.
    """

    model: str
    data: str
    targets: tuple[str, ...]
    out_dir: Path
    weights: str | None = None
    labels: str | None = None
    images: int = 16
    batch_size: int = 4
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    preprocess_overrides: dict[str, Any] | None = None
    threads: int | None = None
    workers: int = 4
    drop_db: float = DEFAULT_DROP_DB
    qdq_ort_defaults: bool = False


# ------------------------------------------------------------------------------------------------ probes


def make_probe(
    target: Target, artifact: Any, loaded: Any, layers: KerasLayers, spec: DiffSpec, providers: Sequence[str]
) -> LayerProbe:
    """The probe of ``target``'s backend (each backend's module registers its own)."""
    options = ProbeOptions(spec.threads, tuple(providers), spec.qdq_ort_defaults)
    return make_layer_probe(target, artifact, loaded, layers, options)


# ------------------------------------------------------------------------------------------------- the job


def _images(evalset: Any, loaded: Any, batch_size: int, workers: int) -> np.ndarray:

    spec = dataclasses.replace(loaded.preprocess, crops=CropMode.CENTER)
    batches = [b.inputs[:, 0] for b in iter_batches(evalset, spec, batch_size, workers)]
    if not batches:
        raise DataError(f"no readable image among the {len(evalset)} evaluation images")
    return np.concatenate(batches).astype(np.float32)


def compare_targets(
    probes: Sequence[LayerProbe], x: np.ndarray, batch_size: int, progress: Callable = track
) -> list[LayerComparison]:
    """Every target's tensors against the first's, accumulated batch by batch (one batch of tensors in memory)."""
    reference = probes[0]
    comparisons = [LayerComparison(reference.name, p.name) for p in probes[1:]]
    starts = list(range(0, len(x), batch_size))
    for i in progress(starts, total=len(starts), desc="diff"):
        xb = x[i : i + batch_size]
        ref = reference.run(xb)
        for probe, comp in zip(probes[1:], comparisons):
            got = probe.run(xb)
            for layer, (value, step) in got.items():
                if layer in ref:
                    comp.update(layer, ref[layer][0], value, step)
    for probe, comp in zip(probes[1:], comparisons):
        comp.tensors = dict(probe.tensors)
    return comparisons


def _check_targets(targets: Sequence[Target]) -> None:
    """Refuse fewer than two targets, or a target on a backend whose tensors diff cannot read."""
    if len(targets) < 2:
        raise ConfigError("--targets: give the reference first and at least one target to compare with it")
    for t in targets:
        check_layer_probe(t)


def _build(
    spec: DiffSpec, targets: Sequence[Target], preprocess: Any, out: Path, providers: Sequence[str]
) -> tuple[Any, Any, Any, dict[str, Any], dict[str, str]]:
    """Load the data and the model, split the images and build the targets: (loaded model, calibration set,
    evaluation set, artifacts, failures); the reference failing to build is an error."""

    dataset = load_dataset(spec.data, labels=spec.labels)
    loaded = load_for(spec.model, spec.weights, preprocess, dataset)
    options = RunnerOptions(threads=spec.threads, providers=tuple(providers))
    settings = RunSettings(spec.calibration, spec.images, options, spec.workers)
    ctx, calib, evalset = prepare_run(loaded, targets, dataset, out, settings)
    try:
        artifacts, failures = build_targets(ctx, targets)
    finally:
        ctx.close()
    if targets[0].name in failures:
        raise ConfigError(f"the reference {targets[0].name} failed to build: {failures[targets[0].name]}")
    return loaded, calib, evalset, artifacts, failures


def _probe_and_compare(
    built: Sequence[Target],
    artifacts: dict[str, Any],
    loaded: Any,
    layers: KerasLayers,
    spec: DiffSpec,
    providers: Sequence[str],
    x: np.ndarray,
) -> tuple[list[LayerProbe], list[LayerComparison]]:
    """Open a probe per built target and compare each with the first on ``x``; the probes are closed afterwards."""
    probes: list[LayerProbe] = []
    try:
        for t in built:
            probes.append(make_probe(t, artifacts.get(t.name), loaded, layers, spec, providers))
        comparisons = compare_targets(probes, x, spec.batch_size)
    finally:
        for p in probes:
            p.close()
    return probes, comparisons


def _summary_row(
    probe: LayerProbe, comp: LayerComparison, rows: list[dict[str, Any]], model: str, images: int, drop_db: float
) -> dict[str, Any]:
    """The summary row of one target against the reference: its first SQNR drop, its output's SQNR, its notes."""
    drop = first_drop(rows)
    last = rows[-1] if rows else None
    return {
        "kind": "summary",
        "reference": comp.reference,
        "target": comp.target,
        "model": model,
        "images": images,
        "layers_compared": len(rows),
        "first_drop_layer": drop["layer"] if drop else None,
        "first_drop_sqnr_db": drop["sqnr_db"] if drop else None,
        "first_drop_input_sqnr_db": drop["input_sqnr_db"] if drop else None,
        "output_layer": last["layer"] if last else None,
        "output_sqnr_db": last["sqnr_db"] if last else None,
        "drop_db": drop_db,
        "session_config": dict(probe.session_config),
        "notes": [
            *probe.notes,
            *(f"shape mismatch, not compared: {k} {v}" for k, v in comp.shape_mismatch.items()),
        ],
    }


def _result_rows(
    probes: Sequence[LayerProbe],
    comparisons: Sequence[LayerComparison],
    layers: KerasLayers,
    model: str,
    images: int,
    drop_db: float,
    failures: dict[str, str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(summary rows, all rows): a summary per compared target, then every layer row, then a row per failed
    target."""
    rows: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    for probe, comp in zip(probes[1:], comparisons):
        layer_rows_ = layer_rows(comp, layers.order, layers.inputs, layers.types, drop_db)
        for r in layer_rows_:
            r["session_config"] = dict(probe.session_config)
        summaries.append(_summary_row(probe, comp, layer_rows_, model, images, drop_db))
        rows += layer_rows_
    rows = summaries + rows
    for name, error in failures.items():
        rows.append({"kind": "summary", "target": name, "status": "failed", "error": error})
    return summaries, rows


def _write_results(out: Path, rows: list[dict[str, Any]], model: str) -> tuple[Path, Path]:
    """Write ``diff.jsonl``, ``environment.json`` and the report under ``out``: (markdown, page) of the report."""

    write_text_atomic(out / "diff.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    write_json_atomic(out / "environment.json", environment())
    return build_report(out, f"quantship diff: {model}")


def _target_lines(summary: dict[str, Any], rows: list[dict[str, Any]], drop_db: float) -> list[str]:
    """The text of one target against the reference: its layer table, notes and first SQNR drop."""
    s = summary
    mine = [r for r in rows if r.get("kind") == "layer" and r["target"] == s["target"]]
    config = ", ".join(f"{k}={v}" for k, v in s["session_config"].items()) or "default session options"
    lines = ["", f"{s['target']} vs {s['reference']} ({config}):", text_table(display_rows(mine), DIFF_COLUMNS)]
    lines += [f"  note: {n}" for n in s["notes"]]
    if s["first_drop_layer"]:
        lines.append(
            f"  first layer whose SQNR drops more than {drop_db:g} dB below its input: "
            f"{s['first_drop_layer']} "
            f"({as_float(s['first_drop_input_sqnr_db']):.1f} -> {as_float(s['first_drop_sqnr_db']):.1f} dB)"
        )
    else:
        lines.append(f"  no layer drops more than {drop_db:g} dB below its input")
    return lines


def run_diff(spec: DiffSpec, providers: Sequence[str] = ("cpu",)) -> JobResult:
    """Compare every target with the first, layer by layer; write ``diff.jsonl`` and the report under ``out_dir``.

    Returns:
        The rows, the tables and the first layer where each target's SQNR drops; exit code 1 when a target failed
        to build.
    """

    targets = parse_targets(spec.targets)
    check_providers_for(targets, providers)
    _check_targets(targets)
    preprocess = resolve_preprocess(spec.model, spec.weights, spec.preprocess_overrides)
    out = Path(spec.out_dir)
    with FolderLock(out, f"quantship diff {spec.model}"):
        loaded, calib, evalset, artifacts, failures = _build(spec, targets, preprocess, out, providers)
        built = [t for t in targets if t.name not in failures]
        x = _images(evalset, loaded, spec.batch_size, spec.workers)
        layers = KerasLayers.of(loaded.model)
        note(f"diff: {len(x)} images, {len(layers.order)} Keras layers, reference {built[0].name}")
        probes, comparisons = _probe_and_compare(built, artifacts, loaded, layers, spec, providers, x)
        summaries, rows = _result_rows(probes, comparisons, layers, loaded.name, len(x), spec.drop_db, failures)
        md, page = _write_results(out, rows, loaded.name)
    lines = [
        f"{len(x)} images, {len(calib)} calibration images; reference {built[0].name}; SQNR, cosine and max |diff| "
        f"(in quantization steps where the target's tensor is quantized) per Keras layer in graph order"
    ]
    for s in summaries:
        lines += _target_lines(s, rows, spec.drop_db)
    lines += [f"FAILED {name}: {error}" for name, error in failures.items()]
    lines.append(f"results: {out / 'diff.jsonl'}; report: {page}, {md}")
    return JobResult(rows, lines, 1 if failures else 0)
