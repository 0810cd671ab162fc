"""``quantship diff``: where do two runtimes part ways? Every intermediate tensor of each target against the first
target's, on the same images, matched through the Keras layer names the converters keep.

* Keras: one multi-output model over every layer.
* TFLite: the interpreter with every tensor kept (LiteRT's builtin kernels: a delegate computes its ops inside
  itself), quantized tensors dequantized with their own scale.
* ONNX: the tensors added as graph outputs, a quantized one read after its Q/DQ through a new DequantizeLinear
  (for a fused ORT int8 model: what its integer kernels wrote), under the session options the target runs with.
  Tensors ONNX Runtime fused away cannot be read without changing what it runs and are left out; the number of
  fused int8 kernels is checked to be the same with and without the extra outputs.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from quantship.config import CalibrationSpec, CropMode
from quantship.convert.layer_names import KerasLayers, onnx_tensor_layers, tflite_tensor_layer
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
from quantship.evaluate.results import text_table
from quantship.fileio import FolderLock, write_json_atomic, write_text_atomic
from quantship.jobs import JobResult
from quantship.progress import note, track
from quantship.runtime.base import RunnerOptions
from quantship.runtime.onnxruntime import QDQ_FAKE_QUANT
from quantship.targets import Target, parse_targets

Capture = dict[str, tuple[np.ndarray, float | None]]  # Keras layer -> (value, NHWC like Keras; quantization step)


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


class _Probe:
    """Runs one target and returns its tensors per Keras layer."""

    name: str
    session_config: tuple[tuple[str, str], ...] = ()
    notes: list[str]
    tensors: dict[str, str]  # layer -> the target's own tensor name

    def run(self, x: np.ndarray) -> Capture: ...

    def close(self) -> None:
        pass


class _KerasProbe(_Probe):
    def __init__(self, name: str, model: Any, layers: KerasLayers):
        from quantship.runtime.keras import layer_outputs

        single = [n for n in layers.order if not isinstance(model.get_layer(n).output, (list, tuple, dict))]
        self.name, self.notes, self.tensors = name, [], {n: n for n in single}
        self._fn = layer_outputs(model, single)

    def run(self, x: np.ndarray) -> Capture:
        return {name: (value, None) for name, value in self._fn(x).items()}


class _TfliteProbe(_Probe):
    def __init__(self, name: str, path: Path, layers: KerasLayers, threads: int | None):
        from quantship.runtime.tflite import TfliteRunner

        self.name, self.layers = name, layers
        self.notes = ["LiteRT builtin kernels (intermediate tensors are not kept inside the XNNPACK delegate)"]
        self.tensors = {}
        self._runner = TfliteRunner(path, threads, name, preserve_all_tensors=True).activate()
        self._inputs = {m.name for m in self._runner.input_metadata()}
        self._outputs = [m.name for m in self._runner.output_metadata()]

    def run(self, x: np.ndarray) -> Capture:
        self._runner.infer(x)
        out: Capture = {}
        for name, value, step in self._runner.intermediate_tensors():
            if name in self._inputs:
                layer = self.layers.input_layer
            elif name in self._outputs and len(self._outputs) == len(self.layers.output_layers):
                layer = self.layers.output_layers[self._outputs.index(name)]  # renamed after the signature
            else:
                layer = tflite_tensor_layer(name, self.layers)
            if layer:  # the last tensor written for a layer holds its output
                out[layer] = (value, step)
                self.tensors[layer] = name
        return out

    def close(self) -> None:
        self._runner.deactivate()


class _OnnxProbe(_Probe):
    def __init__(
        self,
        name: str,
        path: Path,
        layers: KerasLayers,
        session_config: tuple[tuple[str, str], ...],
        threads: int | None,
        providers: Sequence[str],
    ):
        import onnx

        from quantship.runtime.onnxruntime import OnnxRunner, fused_int8_ops, optimized_graph, tap_tensors

        self.name, self.session_config, self.notes = name, session_config, []
        model = onnx.load(str(path))
        mapping = onnx_tensor_layers(model, layers)
        names = [t.name for t in mapping.values()]

        def int8_kernels(m: Any) -> Counter:  # which nodes ORT fused into which kernel (names without its tokens)
            return Counter(re.sub(r"_token_\d+$", "", op) for op in fused_int8_ops(m))

        ran = optimized_graph(model, session_config, threads, providers)
        kernels = int8_kernels(ran)
        # Every mapped tensor as an output, unless that keeps ORT from fusing an int8 group (a float tensor inside
        # DQ -> Conv -> Q): then only the tensors ORT still computes. Float-only fusions (Conv + ReLU) do not matter.
        tapped = tap_tensors(model, names)
        tapped_kernels = int8_kernels(optimized_graph(tapped.model, session_config, threads, providers))
        if tapped_kernels != kernels:
            tapped = tap_tensors(model, names, {o for n in ran.graph.node for o in n.output})
            tapped_kernels = int8_kernels(optimized_graph(tapped.model, session_config, threads, providers))
        if kernels:
            ops = Counter(k.split(":")[0] for k in kernels.elements())
            self.notes.append("ONNX Runtime int8 kernels: " + ", ".join(f"{k} x{n}" for k, n in sorted(ops.items())))
        if tapped_kernels != kernels:
            self.notes.append(
                f"WARNING: reading intermediate tensors changed ONNX Runtime's fusions ({len(kernels)} -> "
                f"{len(tapped_kernels)} int8 kernels): the tensors are those of a slightly different graph"
            )
        if tapped.unobservable:
            self.notes.append(f"{len(tapped.unobservable)} layer output(s) fused away by ONNX Runtime, not compared")
        self._map = {layer: t for layer, t in mapping.items() if t.name in tapped.outputs}
        self._tapped = tapped
        self.tensors = {layer: t.name for layer, t in self._map.items()}
        self._runner = OnnxRunner(
            tapped.model.SerializeToString(), providers, threads, name, session_config=session_config
        ).activate()

    def run(self, x: np.ndarray) -> Capture:
        outs = self._runner.infer(x)
        out: Capture = {}
        for layer, t in self._map.items():
            value = outs[self._tapped.outputs[t.name]]
            if t.channels_first and value.ndim == 4:
                value = value.transpose(0, 2, 3, 1)
            out[layer] = (value, self._tapped.steps.get(t.name))
        return out

    def close(self) -> None:
        self._runner.deactivate()


def _session_config(target: Target, qdq_ort_defaults: bool) -> tuple[tuple[str, str], ...]:
    if qdq_ort_defaults and target.session_config == QDQ_FAKE_QUANT:
        return ()
    return target.session_config


def make_probe(
    target: Target, artifact: Any, loaded: Any, layers: KerasLayers, spec: DiffSpec, providers: Sequence[str]
) -> _Probe:
    backend = target.spec.backend
    if backend == "keras":
        return _KerasProbe(target.name, loaded.model, layers)
    if backend == "tflite":
        return _TfliteProbe(target.name, artifact.path, layers, spec.threads)
    if backend == "onnx":
        config = _session_config(target, spec.qdq_ort_defaults)
        return _OnnxProbe(target.name, artifact.path, layers, config, spec.threads, providers)
    raise ConfigError(f"diff compares keras, tflite and onnx targets; '{target.name}' runs on {backend}")


# ------------------------------------------------------------------------------------------------- the job


def _images(evalset: Any, loaded: Any, batch_size: int, workers: int) -> np.ndarray:
    from quantship.data.datasets import iter_batches

    spec = dataclasses.replace(loaded.preprocess, crops=CropMode.CENTER)
    batches = [b.inputs[:, 0] for b in iter_batches(evalset, spec, batch_size, workers)]
    if not batches:
        raise DataError(f"no readable image among the {len(evalset)} evaluation images")
    return np.concatenate(batches).astype(np.float32)


def compare_targets(
    probes: Sequence[_Probe], x: np.ndarray, batch_size: int, progress: Callable = track
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
        if t.spec.backend not in ("keras", "tflite", "onnx"):
            raise ConfigError(f"diff compares keras, tflite and onnx targets; '{t.name}' runs on {t.spec.backend}")


def _build(
    spec: DiffSpec, targets: Sequence[Target], preprocess: Any, out: Path, providers: Sequence[str]
) -> tuple[Any, Any, Any, dict[str, Any], dict[str, str]]:
    """Load the data and the model, split the images and build the targets: (loaded model, calibration set,
    evaluation set, artifacts, failures); the reference failing to build is an error."""
    from quantship.data.datasets import load_dataset
    from quantship.targets.run import build_targets, load_for, prepare_run

    dataset = load_dataset(spec.data, labels=spec.labels)
    loaded = load_for(spec.model, spec.weights, preprocess, dataset)
    options = RunnerOptions(threads=spec.threads, providers=tuple(providers))
    ctx, calib, evalset = prepare_run(
        loaded, targets, dataset, spec.calibration, spec.images, out, options, spec.workers
    )
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
) -> tuple[list[_Probe], list[LayerComparison]]:
    """Open a probe per built target and compare each with the first on ``x``; the probes are closed afterwards."""
    probes: list[_Probe] = []
    try:
        for t in built:
            probes.append(make_probe(t, artifacts.get(t.name), loaded, layers, spec, providers))
        comparisons = compare_targets(probes, x, spec.batch_size)
    finally:
        for p in probes:
            p.close()
    return probes, comparisons


def _summary_row(
    probe: _Probe, comp: LayerComparison, rows: list[dict[str, Any]], model: str, images: int, drop_db: float
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
    probes: Sequence[_Probe],
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
    from quantship.evaluate.environment import environment
    from quantship.evaluate.report import build_report

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
    from quantship.models.loading import resolve_preprocess

    targets = parse_targets(spec.targets)
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
